"""The PPO run config: the run config's sections plus `ppo` (the algorithm) and `grader` (the reward service)."""
from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import Field, model_validator

from distributed_ft.config.base import StrictModel
from distributed_ft.config.schema import LoggingConfig, ModelConfig, OutputConfig, TrainingConfig
from distributed_ft.data.config import DataConfig
from distributed_ft.errors import ConfigError
from distributed_ft.eval.config import EvalConfig


class KLConfig(StrictModel):
    coef: float = Field(default=0.05, ge=0)
    adaptive: bool = False
    target: float = Field(default=6.0, gt=0)     # target KL per sequence for the adaptive controller
    horizon: int = Field(default=10000, gt=0)    # samples over which the controller closes the gap


class CriticConfig(StrictModel):
    mode: Literal["separate", "shared"] = "shared"
    vf_coef: float = Field(default=0.1, ge=0)


class RewardConfig(StrictModel):
    normalize: Literal["none", "batch"] = "none"   # batch: whiten scores over the step's samples on all ranks
    clip: float | None = Field(default=None, gt=0)  # clip the (normalised) score to [-clip, clip]
    scale: float = 1.0


class PPOConfig(StrictModel):
    rollout_batch_size: int = Field(default=16, ge=1)    # prompts per PPO step, over all ranks
    num_generations: int = Field(default=2, ge=1)        # samples per prompt
    max_new_tokens: int = Field(default=16, ge=1)
    temperature: float = Field(default=1.0, gt=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    ppo_epochs: int = Field(default=2, ge=1)
    minibatch_size: int | None = Field(default=None, ge=1)  # samples per optimizer step over all ranks
    clip_range: float = Field(default=0.2, gt=0)
    value_clip_range: float = Field(default=0.2, gt=0)
    gamma: float = Field(default=1.0, ge=0, le=1)
    lam: float = Field(default=0.95, ge=0, le=1)
    kl: KLConfig = KLConfig()
    entropy_coef: float = Field(default=0.0, ge=0)
    reward: RewardConfig = RewardConfig()
    critic: CriticConfig = CriticConfig()
    unscorable_threshold: float = Field(default=0.5, ge=0, le=1)  # abort above this share of unscorable samples
    whiten_advantages: bool = True
    sample_every: int = Field(default=10, ge=1)   # log a few completions every N steps
    num_logged_samples: int = Field(default=3, ge=0)
    eval_prompts: int = Field(default=64, ge=0)   # held-out prompts graded before and after training


class GraderSection(StrictModel):
    config: str | None = None       # a grader spec: a local server is started on the main process
    urls: list[str] | None = None   # servers already running
    timeout_s: float = Field(default=60.0, gt=0)
    retries: int = Field(default=2, ge=0)
    startup_timeout_s: float = Field(default=120.0, gt=0)
    host: str = "127.0.0.1"         # where a started server listens

    @model_validator(mode="after")
    def _one_source(self):
        if (self.config is None) == (not self.urls):
            raise ValueError("set exactly one of grader.config and grader.urls")
        return self


class PPORunConfig(StrictModel):
    model: ModelConfig
    data: DataConfig
    strategy: Any
    ppo: PPOConfig = PPOConfig()
    grader: GraderSection
    training: TrainingConfig = TrainingConfig(learning_rate=1e-4, lr_scheduler="constant")
    logging: LoggingConfig = LoggingConfig()
    eval: EvalConfig = EvalConfig(enabled=False)
    output: OutputConfig = OutputConfig(dir="runs/ppo")


def load_ppo_config(path: str | os.PathLike, overrides: list[str] | None = None) -> PPORunConfig:
    """Read, override and validate a PPO config; every problem is a one-line ConfigError."""
    from distributed_ft.config import load_sections

    source = str(path)
    config, strategy = load_sections(path, overrides, PPORunConfig,
                                     required={"grader": "grader.config: <spec.yaml> or grader.urls: [...]"})
    _check(config, strategy, source)
    if config.grader.config is not None:
        from distributed_ft.grader.spec import load_grader_spec

        load_grader_spec(config.grader.config)  # fail before any model is loaded
    return config


def _check(config: PPORunConfig, strategy, source: str) -> None:
    if config.model.task != "causal_lm":
        raise ConfigError(f"{source}: PPO trains causal_lm models; model.task is {config.model.task}")
    if not strategy.trains:
        raise ConfigError(f"{source}: strategy '{strategy.name}' trains nothing; PPO needs a training strategy")
    if config.training.max_steps == 0:
        raise ConfigError(f"{source}: training.max_steps (PPO steps) is 0")
    if config.data.packing:
        raise ConfigError(f"{source}: data.packing does not apply to PPO prompts")
    samples = config.ppo.rollout_batch_size * config.ppo.num_generations
    mb = config.ppo.minibatch_size
    if mb is not None and samples % mb:
        raise ConfigError(f"{source}: ppo.minibatch_size {mb} does not divide the {samples} samples per step "
                          f"(rollout_batch_size x num_generations)")


def check_topology(config: PPORunConfig, world: int) -> tuple[int, int]:
    """(minibatch size over all ranks, number of minibatches per epoch) for `world` ranks, or a ConfigError."""
    ppo, training = config.ppo, config.training
    if ppo.rollout_batch_size % world:
        raise ConfigError(f"ppo.rollout_batch_size {ppo.rollout_batch_size} is not divisible by the "
                          f"{world} processes")
    samples = ppo.rollout_batch_size * ppo.num_generations
    implied = training.micro_batch_size * training.gradient_accumulation_steps * world
    mb = ppo.minibatch_size or implied
    if mb != implied:
        raise ConfigError(f"ppo.minibatch_size {mb} must equal training.micro_batch_size x "
                          f"gradient_accumulation_steps x processes = {implied}")
    if samples % mb:
        raise ConfigError(f"the minibatch of {mb} samples (micro_batch_size x gradient_accumulation_steps x "
                          f"processes) does not divide the {samples} samples per step")
    return mb, samples // mb
