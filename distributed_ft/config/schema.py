"""Each kind of run config, composed from the sections their packages own."""
from __future__ import annotations

from typing import Any

from distributed_ft.data.config import DataConfig
from distributed_ft.engine.config import LoggingConfig, OutputConfig, TrainingConfig
from distributed_ft.eval.config import EvalConfig
from distributed_ft.models.config import ModelConfig
from distributed_ft.preference.config import DPOConfig, PairsConfig, RMConfig, SamplesConfig
from distributed_ft.rl.config import GraderSection, GRPOConfig, PPOConfig
from distributed_ft.strict import StrictModel


class RunConfig(StrictModel):
    """A supervised fine-tuning run. `strategy` holds the registered strategy's own config model."""

    model: ModelConfig
    data: DataConfig
    strategy: Any
    training: TrainingConfig = TrainingConfig()
    logging: LoggingConfig = LoggingConfig()
    eval: EvalConfig = EvalConfig()
    output: OutputConfig = OutputConfig()


class _RLRunSections(StrictModel):
    """What every RL run has: the run sections plus `grader` (the reward service)."""

    model: ModelConfig
    data: DataConfig
    strategy: Any
    grader: GraderSection
    training: TrainingConfig = TrainingConfig(learning_rate=1e-4, lr_scheduler="constant")
    logging: LoggingConfig = LoggingConfig()
    eval: EvalConfig = EvalConfig(enabled=False)


class PPORunConfig(_RLRunSections):
    """A PPO run: the RL sections plus `ppo` (the algorithm)."""

    ppo: PPOConfig = PPOConfig()
    output: OutputConfig = OutputConfig(dir="runs/ppo")


class GRPORunConfig(_RLRunSections):
    """A critic-free RL run (GRPO family): the RL sections plus `grpo` (the algorithm)."""

    grpo: GRPOConfig = GRPOConfig()
    output: OutputConfig = OutputConfig(dir="runs/grpo")


class EvalRunConfig(StrictModel):
    """`dft eval`: a model (base, saved model or adapter, run directory) on validation data.

    `training` is read only for the seed, precision and launch settings the accelerator takes.
    """

    model: ModelConfig
    data: DataConfig
    eval: EvalConfig = EvalConfig()
    training: TrainingConfig = TrainingConfig(max_steps=0)
    output: OutputConfig = OutputConfig(dir="runs/eval")


class _PairRunSections(StrictModel):
    model: ModelConfig
    strategy: Any
    training: TrainingConfig = TrainingConfig(learning_rate=1e-4)
    logging: LoggingConfig = LoggingConfig()


class DPORunConfig(_PairRunSections):
    """`dft dpo`: preference optimisation of a causal LM on `pairs` with the `dpo` objective."""

    pairs: PairsConfig
    dpo: DPOConfig = DPOConfig()
    # generations for the held-out prompts scored against their chosen answers, before and after, as `dft train`
    eval: EvalConfig = EvalConfig()
    output: OutputConfig = OutputConfig(dir="runs/dpo")


class RMRunConfig(_PairRunSections):
    """`dft rm`: a one-output sequence-classification head trained on `pairs` (pairwise) or `samples` (pointwise)."""

    pairs: PairsConfig | None = None
    samples: SamplesConfig | None = None
    rm: RMConfig = RMConfig()
    output: OutputConfig = OutputConfig(dir="runs/rm")
