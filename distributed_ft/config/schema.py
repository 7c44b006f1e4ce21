"""The run config: one typed section per concern, composed into RunConfig."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from distributed_ft.config.base import StrictModel
from distributed_ft.data.config import DataConfig
from distributed_ft.eval.config import EvalConfig

TaskType = Literal["causal_lm", "sequence_classification", "regression"]


class ModelConfig(StrictModel):
    name_or_path: str | None = None
    builtin: Literal["tiny"] | None = None
    task: TaskType = "causal_lm"
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


class TrainingConfig(StrictModel):
    max_steps: int = Field(default=100, ge=0)
    micro_batch_size: int = Field(default=8, ge=1)
    gradient_accumulation_steps: int = Field(default=1, ge=1)
    learning_rate: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    optimizer: Literal["adamw", "adam", "sgd", "adafactor"] = "adamw"
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_epsilon: float = 1e-8
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = Field(default=0, ge=0)
    min_lr_ratio: float = Field(default=0.0, ge=0, le=1)
    max_grad_norm: float | None = Field(default=1.0, gt=0)
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    seed: int = 42
    checkpoint_every: int | None = Field(default=None, ge=1)
    keep_checkpoints: int = Field(default=2, ge=2)
    resume_from: str | None = None

    @model_validator(mode="after")
    def _warmup_fits(self):
        if self.max_steps and self.warmup_steps > self.max_steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) exceeds max_steps ({self.max_steps})")
        return self


class WandbConfig(StrictModel):
    mode: Literal["disabled", "offline", "online"] = "disabled"
    project: str = "distributed_ft"
    entity: str | None = None
    run_name: str | None = None
    tags: list[str] = []


class LoggingConfig(StrictModel):
    log_every: int = Field(default=10, ge=1)
    progress_bar: bool = True
    wandb: WandbConfig = WandbConfig()


class OutputConfig(StrictModel):
    dir: str = "runs/default"
    overwrite: bool = False


class RunConfig(StrictModel):
    """A whole run. `strategy` holds the registered strategy's own config model."""

    model: ModelConfig
    data: DataConfig
    strategy: Any
    training: TrainingConfig = TrainingConfig()
    logging: LoggingConfig = LoggingConfig()
    eval: EvalConfig = EvalConfig()
    output: OutputConfig = OutputConfig()


SECTIONS = ("model", "data", "strategy", "training", "logging", "eval", "output")
