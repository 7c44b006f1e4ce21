"""The `model` config section: where the model comes from and how it is loaded."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from distributed_ft.strict import StrictModel
from distributed_ft.tasks import ModelTask


class ModelConfig(StrictModel):
    name_or_path: str | None = None
    builtin: Literal["tiny"] | None = None
    task: ModelTask = "causal_lm"
    num_labels: int | None = Field(default=None, ge=1)
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    revision: str | None = None
    trust_remote_code: bool = False
    attn_implementation: str | None = None
    gradient_checkpointing: bool = False

    @model_validator(mode="after")
    def _one_source(self):
        if (self.name_or_path is None) == (self.builtin is None):
            raise ValueError("set exactly one of model.name_or_path and model.builtin")
        return self
