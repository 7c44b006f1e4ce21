"""The `data` config section: which datasets to train and validate on, and how to tokenize them."""
from __future__ import annotations

from pathlib import PurePath
from typing import Literal

from pydantic import Field, model_validator

from distributed_ft.strict import StrictModel

BuiltinName = Literal["arithmetic", "reverse", "sort", "copy", "parity", "count"]
FormatName = Literal["auto", "text", "prompt_completion", "chat", "instruction", "classification", "regression"]

# Canonical column names a row can be mapped onto through `columns`.
CANONICAL_COLUMNS = ("prompt", "completion", "text", "label", "value", "messages", "instruction", "input",
                     "output")


class DatasetSpec(StrictModel):
    """One dataset: a built-in synthetic task, a local file, or a hub dataset."""

    builtin: BuiltinName | None = None
    path: str | None = None
    hub: str | None = None
    hub_config: str | None = None
    split: str = "train"
    format: FormatName = "auto"
    columns: dict[str, str] = {}
    weight: float = Field(default=1.0, gt=0)
    task: str | None = None
    num_examples: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _one_source(self):
        given = [name for name in ("builtin", "path", "hub") if getattr(self, name) is not None]
        if len(given) != 1:
            found = f"got {', '.join(given)}" if given else "got none"
            raise ValueError(f"set exactly one of builtin, path and hub ({found})")
        unknown = sorted(set(self.columns) - set(CANONICAL_COLUMNS))
        if unknown:
            raise ValueError(f"columns key '{unknown[0]}' is not a canonical column "
                             f"(valid: {', '.join(CANONICAL_COLUMNS)})")
        if self.builtin is not None and (self.columns or self.format != "auto"):
            raise ValueError(f"builtin '{self.builtin}' takes no 'format' or 'columns'")
        if self.hub_config is not None and self.hub is None:
            raise ValueError("hub_config applies only to a hub dataset")
        if self.task is not None and not self.task.strip():
            raise ValueError("task name must not be empty")
        return self

    @property
    def task_name(self) -> str:
        """The task this dataset feeds: `task`, else the builtin name, file stem or hub name."""
        if self.task:
            return self.task
        if self.builtin:
            return self.builtin
        if self.path:
            return PurePath(self.path).stem
        return self.hub.rstrip("/").split("/")[-1]

    @property
    def source(self) -> str:
        """A short human description of where the rows come from, for error messages."""
        if self.builtin:
            return f"builtin '{self.builtin}'"
        if self.path:
            return self.path
        return f"hub dataset '{self.hub}'" + (f" ({self.hub_config})" if self.hub_config else "")


class DataConfig(StrictModel):
    """Training and validation datasets, sequence length, loss masking and packing."""

    train: list[DatasetSpec] = Field(min_length=1)
    validation: list[DatasetSpec] | None = None
    validation_fraction: float = Field(default=0.0, ge=0.0, lt=0.5)
    max_length: int = Field(default=256, gt=0)
    overlong: Literal["truncate", "drop"] = "truncate"
    loss_on: Literal["completion", "all"] = "completion"
    packing: bool = False

    @model_validator(mode="after")
    def _checks(self):
        if self.validation and self.validation_fraction > 0:
            raise ValueError("validation_fraction cannot be combined with validation datasets; use one")
        seen: set[str] = set()
        for spec in self.train:
            if spec.task_name in seen:
                raise ValueError(f"task name '{spec.task_name}' is used by two train datasets; "
                                 f"give one a distinct 'task'")
            seen.add(spec.task_name)
        return self
