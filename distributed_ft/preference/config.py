"""The config sections preference runs read: `pairs` (the data), `dpo` and `rm` (the objectives)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from distributed_ft.strict import StrictModel

PairBuiltin = Literal["arithmetic", "reverse", "sort", "copy", "parity", "count"]
# Canonical pair columns a file's own column names can be mapped onto.
PAIR_COLUMNS = ("prompt", "chosen", "rejected", "margin")


class PairSource(StrictModel):
    """One source of preference pairs: a built-in synthetic pair task or a local file."""

    builtin: PairBuiltin | None = None
    path: str | None = None
    split: str = "train"
    columns: dict[str, str] = {}   # canonical -> the file's column
    num_examples: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _one_source(self):
        if (self.builtin is None) == (self.path is None):
            raise ValueError("set exactly one of builtin and path")
        unknown = sorted(set(self.columns) - set(PAIR_COLUMNS))
        if unknown:
            raise ValueError(f"columns key '{unknown[0]}' is not a pair column (valid: {', '.join(PAIR_COLUMNS)})")
        if self.builtin is not None and self.columns:
            raise ValueError(f"builtin '{self.builtin}' takes no 'columns'")
        return self

    @property
    def source(self) -> str:
        return f"builtin '{self.builtin}'" if self.builtin else str(self.path)

    @property
    def task_name(self) -> str:
        """The task its held-out prompts are reported under: the built-in's name or the file's stem."""
        from pathlib import Path

        return self.builtin or Path(self.path).stem


class PairsConfig(StrictModel):
    train: list[PairSource] = Field(min_length=1)
    validation: list[PairSource] = []
    # held out from `train` when no validation source is given
    validation_fraction: float = Field(default=0.1, ge=0.0, lt=1.0)
    max_length: int = Field(default=128, ge=8)        # prompt + completion tokens, per side
    max_prompt_length: int | None = Field(default=None, ge=1)  # the prompt's last tokens kept; default half
    eval_pairs: int = Field(default=200, ge=1)        # held-out pairs scored before and after training

    @model_validator(mode="after")
    def _prompt_fits(self):
        if self.max_prompt_length is not None and self.max_prompt_length >= self.max_length:
            raise ValueError(f"max_prompt_length ({self.max_prompt_length}) must be below max_length "
                             f"({self.max_length})")
        return self

    @property
    def prompt_limit(self) -> int:
        return self.max_prompt_length or self.max_length // 2


class DPOConfig(StrictModel):
    loss: Literal["sigmoid", "ipo", "hinge", "simpo"] = "sigmoid"
    beta: float = Field(default=0.1, gt=0)
    label_smoothing: float = Field(default=0.0, ge=0.0, lt=0.5)   # conservative DPO (sigmoid only)
    simpo_gamma: float = Field(default=0.5, ge=0.0)               # SimPO's target reward margin
    # live: the policy with its adapter disabled (PEFT) or a frozen copy; precomputed: one pass before
    # training, kept in the run folder so a resume reuses it
    reference: Literal["live", "precomputed"] = "live"

    @model_validator(mode="after")
    def _smoothing_applies(self):
        if self.label_smoothing and self.loss != "sigmoid":
            raise ValueError(f"label_smoothing applies to the sigmoid loss only (loss is {self.loss})")
        return self


class GradedSource(StrictModel):
    """Graded samples for a pointwise grader: a built-in task (scored by a rule grader) or a JSONL file."""

    builtin: PairBuiltin | None = None
    path: str | None = None
    num_examples: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _one_source(self):
        if (self.builtin is None) == (self.path is None):
            raise ValueError("set exactly one of builtin and path")
        return self


class SamplesConfig(StrictModel):
    train: list[GradedSource] = Field(min_length=1)
    validation_fraction: float = Field(default=0.1, gt=0.0, lt=1.0)
    max_length: int = Field(default=128, ge=8)
    eval_samples: int = Field(default=200, ge=2)
    # the grader config that scored the file samples (`dft grader label --config`), timed against the trained
    # model on the held-out samples; built-in samples default to their own rule grader
    grader: str | None = None


class RMConfig(StrictModel):
    # pairwise: Bradley-Terry on `pairs`; pointwise: (prompt, output, reference) -> score regression on `samples`
    objective: Literal["pairwise", "pointwise"] = "pairwise"
    threshold: float = 0.5                   # pointwise: accuracy of "score >= threshold" against the source
    margin: float = 0.0                      # a fixed margin; a `margin` column overrides it per pair
    center_rewards_coefficient: float | None = Field(default=None, ge=0.0)
