"""The `ppo` (the algorithm) and `grader` (the reward service) config sections, and the topology check."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from distributed_ft.errors import ConfigError
from distributed_ft.strict import StrictModel


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


def check_topology(config, world: int) -> tuple[int, int]:
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
