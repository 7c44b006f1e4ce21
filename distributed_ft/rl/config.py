"""The RL config sections: `ppo` (PPO with a critic), `grpo` (the critic-free, group-relative family),
`grader` (the reward service), and the topology check both algorithms share."""
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


class RolloutConfig(StrictModel):
    """What every RL algorithm here shares: how a step's samples are drawn, updated on and reported."""

    rollout_batch_size: int = Field(default=16, ge=1)    # prompts per step, over all ranks
    num_generations: int = Field(default=2, ge=1)        # samples per prompt
    max_new_tokens: int = Field(default=16, ge=1)
    temperature: float = Field(default=1.0, gt=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    ppo_epochs: int = Field(default=2, ge=1)             # passes over each rollout
    minibatch_size: int | None = Field(default=None, ge=1)  # samples per optimizer step over all ranks
    entropy_coef: float = Field(default=0.0, ge=0)
    unscorable_threshold: float = Field(default=0.5, ge=0, le=1)  # abort above this share of unscorable samples
    sample_every: int = Field(default=10, ge=1)   # log a few completions every N steps
    num_logged_samples: int = Field(default=3, ge=0)
    eval_prompts: int = Field(default=64, ge=0)   # held-out prompts graded before and after training


class PPOConfig(RolloutConfig):
    clip_range: float = Field(default=0.2, gt=0)
    value_clip_range: float = Field(default=0.2, gt=0)
    gamma: float = Field(default=1.0, ge=0, le=1)
    lam: float = Field(default=0.95, ge=0, le=1)
    kl: KLConfig = KLConfig()
    reward: RewardConfig = RewardConfig()
    critic: CriticConfig = CriticConfig()
    whiten_advantages: bool = True


Algorithm = Literal["grpo", "dr_grpo", "dapo", "rloo", "reinforce_pp", "reinforce_pp_baseline", "gspo"]
# group_mean_std: (r - group mean) / (group std + 1e-4) (GRPO); group_mean: r - group mean (Dr.GRPO);
# leave_one_out: r - mean of the group's other samples (RLOO); batch: token returns whitened over the global
# batch (REINFORCE++); group_mean_batch: group mean removed first, then the same whitening.
Advantage = Literal["group_mean_std", "group_mean", "leave_one_out", "batch", "group_mean_batch"]
# How per-token losses become the minibatch loss (the denominators are global: every rank's minibatch share):
# token_mean over all tokens; seq_mean_token_mean: each sequence's token mean, averaged over sequences;
# seq_mean_token_sum: token sums averaged over sequences; seq_mean_token_sum_norm: the same divided by
# max_new_tokens (Dr.GRPO: no length normalisation, a constant scale).
Aggregation = Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm"]


class GroupKLConfig(StrictModel):
    """KL to the reference policy. beta 0: none, and no reference model is built."""

    beta: float = Field(default=0.04, ge=0)
    mode: Literal["loss", "reward"] = "loss"   # a loss term, or a per-token penalty in the reward (as PPO)
    estimator: Literal["k1", "k2", "k3"] = "k3"  # k1: logp - ref; k2: (logp - ref)^2 / 2; k3: Schulman's


class DynamicSamplingConfig(StrictModel):
    """DAPO: groups whose rewards are all equal teach nothing; draw more prompts to replace them."""

    enabled: bool = False
    max_rounds: int = Field(default=3, ge=1)   # generation rounds per step at most (the first included)


class OverlongConfig(StrictModel):
    """Completions that hit max_new_tokens without stopping: kept, masked out of the loss, or penalised
    linearly over the last `buffer` tokens (DAPO's soft overlong punishment, -penalty at the limit)."""

    mode: Literal["none", "mask", "penalty"] = "none"
    buffer: int | None = Field(default=None, ge=1)   # default: a quarter of max_new_tokens
    penalty: float = Field(default=1.0, ge=0)


# Each algorithm is a set of defaults; any key the config sets wins over its algorithm's default.
_CLIP = dict(epsilon_low=0.2, epsilon_high=0.2, importance_ratio="token")
ALGORITHM_DEFAULTS: dict[str, dict] = {
    "grpo": dict(advantage="group_mean_std", loss_aggregation="seq_mean_token_mean", **_CLIP,
                 kl=dict(beta=0.04, mode="loss", estimator="k3")),
    "dr_grpo": dict(advantage="group_mean", loss_aggregation="seq_mean_token_sum_norm", **_CLIP,
                    kl=dict(beta=0.0)),
    "dapo": dict(advantage="group_mean_std", loss_aggregation="token_mean", **{**_CLIP, "epsilon_high": 0.28},
                 kl=dict(beta=0.0), dynamic_sampling=dict(enabled=True), overlong=dict(mode="penalty")),
    "rloo": dict(advantage="leave_one_out", loss_aggregation="token_mean", **_CLIP,
                 kl=dict(beta=0.05, mode="reward", estimator="k1")),
    "reinforce_pp": dict(advantage="batch", loss_aggregation="token_mean", **_CLIP,
                         kl=dict(beta=0.01, mode="reward", estimator="k1")),
    "reinforce_pp_baseline": dict(advantage="group_mean_batch", loss_aggregation="token_mean", **_CLIP,
                                  kl=dict(beta=0.01, mode="reward", estimator="k1")),
    "gspo": dict(advantage="group_mean_std", loss_aggregation="seq_mean_token_mean", epsilon_low=3e-4,
                 epsilon_high=4e-4, importance_ratio="sequence", kl=dict(beta=0.0)),
}


class GRPOConfig(RolloutConfig):
    """The critic-free family: several completions per prompt, advantages from the group (or the batch).

    `algorithm` fills every field the config leaves out (ALGORITHM_DEFAULTS); `dft config show` prints them."""

    algorithm: Algorithm = "grpo"
    num_generations: int = Field(default=4, ge=2)
    ppo_epochs: int = Field(default=1, ge=1)
    advantage: Advantage = "group_mean_std"
    loss_aggregation: Aggregation = "seq_mean_token_mean"
    epsilon_low: float = Field(default=0.2, gt=0, lt=1)
    epsilon_high: float = Field(default=0.2, gt=0)
    importance_ratio: Literal["token", "sequence"] = "token"  # sequence: GSPO's length-normalised ratio
    kl: GroupKLConfig = GroupKLConfig()
    dynamic_sampling: DynamicSamplingConfig = DynamicSamplingConfig()
    overlong: OverlongConfig = OverlongConfig()
    reward_scale: float = Field(default=1.0, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _algorithm_defaults(cls, data):
        if not isinstance(data, dict) or data.get("algorithm", "grpo") not in ALGORITHM_DEFAULTS:
            return data  # not a mapping, or an unknown algorithm: field validation names the problem
        data = dict(data)
        for key, default in ALGORITHM_DEFAULTS[data.get("algorithm", "grpo")].items():
            given = data.get(key)
            if isinstance(default, dict):
                data[key] = {**default, **given} if isinstance(given, dict) else (default if given is None else given)
            elif key not in data:
                data[key] = default
        return data

    @model_validator(mode="after")
    def _check(self):
        if self.overlong.buffer is not None and self.overlong.buffer > self.max_new_tokens:
            raise ValueError(f"overlong.buffer {self.overlong.buffer} exceeds max_new_tokens {self.max_new_tokens}")
        if self.epsilon_high < self.epsilon_low and self.importance_ratio == "token":
            raise ValueError(f"epsilon_high {self.epsilon_high} is below epsilon_low {self.epsilon_low}")
        return self

    @property
    def uses_reference(self) -> bool:
        return self.kl.beta > 0

    @property
    def overlong_buffer(self) -> int:
        return self.overlong.buffer or max(1, self.max_new_tokens // 4)


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


def check_topology(config, world: int, section: str = "ppo") -> tuple[int, int]:
    """(minibatch size over all ranks, number of minibatches per epoch) for `world` ranks, or a ConfigError.

    Each rank holds whole groups (all `num_generations` samples of its prompts), so prompts divide by ranks."""
    ppo, training = getattr(config, section), config.training
    if ppo.rollout_batch_size % world:
        raise ConfigError(f"{section}.rollout_batch_size {ppo.rollout_batch_size} is not divisible by the "
                          f"{world} processes")
    samples = ppo.rollout_batch_size * ppo.num_generations
    implied = training.micro_batch_size * training.gradient_accumulation_steps * world
    mb = ppo.minibatch_size or implied
    if mb != implied:
        raise ConfigError(f"{section}.minibatch_size {mb} must equal training.micro_batch_size x "
                          f"gradient_accumulation_steps x processes = {implied}")
    if samples % mb:
        raise ConfigError(f"the minibatch of {mb} samples (micro_batch_size x gradient_accumulation_steps x "
                          f"processes) does not divide the {samples} samples per step")
    return mb, samples // mb
