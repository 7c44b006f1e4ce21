"""The config sections the engine reads: `training` (the loop), `logging` and `output` (the run folder)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from distributed_ft.strict import StrictModel

DEFAULT_LOSS_CHUNK_TOKENS = 1024


class TrainingConfig(StrictModel):
    max_steps: int = Field(default=100, ge=0)
    micro_batch_size: int = Field(default=8, ge=1)
    gradient_accumulation_steps: int = Field(default=1, ge=1)
    learning_rate: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    optimizer: Literal["adamw", "adam", "sgd", "adafactor"] = "adamw"
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_epsilon: float = 1e-8
    fused_optimizer: bool = True  # adam / adamw as torch's fused kernel (engine/optim.py)
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = Field(default=0, ge=0)
    min_lr_ratio: float = Field(default=0.0, ge=0, le=1)
    max_grad_norm: float | None = Field(default=1.0, gt=0)
    # auto: bf16 autocast where the device computes bf16 natively, else fp32 (engine/precision.py)
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    # each micro-batch as a few passes over rows of similar length, each padded to its own longest row:
    # the same gradient without computing on padding (engine/length_groups.py)
    length_grouping: bool = True
    # causal LMs: each micro-batch's examples end to end in one row, each attending only to itself (no compute on
    # padding, one pass); where a model cannot do it exactly, length-grouped passes (engine/padding_free.py)
    padding_free: bool = True
    # the causal-LM loss (training, and evaluation's reference loss) and the per-token log-probs of DPO and
    # PPO/GRPO: the head's logits for this many tokens at a time, recomputed in backward, so a batch's
    # full-vocabulary logits never exist at once (null: the whole batch's at once; models whose logits are not
    # the head's output always take that path)
    loss_chunk_tokens: int | None = Field(default=DEFAULT_LOSS_CHUNK_TOKENS, ge=1)
    # torch.compile of the model (dft train): on 2 CPU cores a 4.2M Llama's fixed-length step ran 8% faster in
    # fp32 and 21% in bf16 after a first step of 4-18 s, which a short run or varied lengths do not repay
    compile: bool = False
    seed: int = 42
    checkpoint_every: int | None = Field(default=None, ge=1)
    keep_checkpoints: int = Field(default=2, ge=2)
    resume_from: str | None = None

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no(cls, value):
        return "no" if value is False else value  # YAML reads a bare `no` as false

    @model_validator(mode="after")
    def _warmup_fits(self):
        if self.max_steps and self.warmup_steps > self.max_steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) exceeds max_steps ({self.max_steps})")
        return self


# accelerate's experiment trackers (accelerate.tracking); each needs its own package installed.
TrackerName = Literal["wandb", "tensorboard", "mlflow", "aim", "comet_ml", "clearml", "dvclive", "swanlab",
                      "trackio"]


class WandbConfig(StrictModel):
    # None: online when `wandb` is in logging.trackers; offline/online also turn it on.
    mode: Literal["disabled", "offline", "online"] | None = None
    entity: str | None = None
    tags: list[str] = []


class LoggingConfig(StrictModel):
    log_every: int = Field(default=10, ge=1)
    progress_bar: bool = True
    # metrics.jsonl is always written; these trackers get the same rows (keys only from the environment
    # or the tool's own login store, never from the config)
    trackers: list[TrackerName] = []
    project: str = "distributed_ft"  # the project / experiment every tracker files the run under
    run_name: str | None = None
    wandb: WandbConfig = WandbConfig()

    @property
    def active_trackers(self) -> list[str]:
        names = list(dict.fromkeys(self.trackers))
        if self.wandb.mode in ("offline", "online") and "wandb" not in names:
            names.append("wandb")
        if self.wandb.mode == "disabled" and "wandb" in names:
            names.remove("wandb")
        return names


class OutputConfig(StrictModel):
    dir: str = "runs/default"
    overwrite: bool = False
