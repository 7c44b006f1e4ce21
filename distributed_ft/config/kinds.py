"""The kinds of config the project reads, each with its schema and cross-field rules, and how a file's
kind is told from its sections. A new recipe adds one ConfigKind here and its schema in schema.py."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from distributed_ft.config.loader import parse_run_sections
from distributed_ft.config.schema import (DPORunConfig, EvalRunConfig, GRPORunConfig, PPORunConfig, RMRunConfig,
                                          RunConfig)
from distributed_ft.errors import ConfigError, DftError
from distributed_ft.tasks import kind_of


@dataclass(frozen=True)
class ConfigKind:
    name: str
    description: str
    # parse(raw, source) -> the validated config; every problem is a one-line ConfigError
    parse: Callable[[dict, str], Any]
    # the top-level keys that mark a file as this kind (the first kind whose marker is present wins)
    markers: tuple[str, ...]


def _check_training_steps(config, strategy, source: str) -> None:
    training = config.training
    if not strategy.trains and "max_steps" in training.model_fields_set and training.max_steps > 0:
        raise ConfigError(f"{source}: strategy '{strategy.name}' trains nothing, "
                          f"but training.max_steps is {training.max_steps}; remove it or set it to 0")
    if strategy.trains and training.max_steps == 0:
        raise ConfigError(f"{source}: training.max_steps is 0 for strategy '{strategy.name}', which trains")


def _check_quantized_base(config, strategy, source: str) -> None:
    """A 4-bit base stays frozen: only a strategy that trains adapters over it (or trains nothing) may take it."""
    if not config.model.load_in_4bit or strategy.quantized_base or not strategy.trains:
        return
    from distributed_ft.strategies import registered

    takers = ", ".join(name for name, s in registered().items() if s.quantized_base)
    raise ConfigError(f"{source}: model.load_in_4bit freezes the base in 4 bits, but strategy '{strategy.name}' "
                      f"trains base weights; use a strategy that trains adapters over it ({takers})")


def _check_not_compiled(config, source: str, section: str) -> None:
    if config.training.compile:
        raise ConfigError(f"{source}: training.compile applies to `dft train`; {section} runs its model uncompiled")


def _check_model_and_eval(config, source: str) -> None:
    if config.model.task == "causal_lm" and config.model.num_labels is not None:
        raise ConfigError(f"{source}: model.num_labels is only for sequence_classification models")
    if config.model.dtype == "fp16" and config.training.mixed_precision == "bf16":
        raise ConfigError(f"{source}: model.dtype fp16 with training.mixed_precision bf16 mixes precisions; pick one")
    kind = kind_of(config.model.task)
    try:
        config.eval.check_task_types({spec.task_name: kind for spec in config.data.train})
    except DftError as err:
        raise ConfigError(f"{source}: eval.metrics: {err}") from None


def parse_sft(raw: dict, source: str) -> RunConfig:
    config, strategy = parse_run_sections(raw, source, RunConfig)
    _check_training_steps(config, strategy, source)
    _check_quantized_base(config, strategy, source)
    _check_model_and_eval(config, source)
    if config.data.packing and not strategy.supports_packing:
        raise ConfigError(f"{source}: data.packing cannot be used with strategy '{strategy.name}': its virtual "
                          "tokens drop the position_ids that keep packed examples apart; turn packing off")
    return config


def _parse_rl(raw: dict, source: str, schema, section: str):
    """An RL run (PPO or the GRPO family): a causal LM, a training strategy, prompts and a grader."""
    name = section.upper()
    config, strategy = parse_run_sections(raw, source, schema,
                                          required={"grader": "grader.config: <spec.yaml> or grader.urls: [...]"})
    if config.model.task != "causal_lm":
        raise ConfigError(f"{source}: {name} trains causal_lm models; model.task is {config.model.task}")
    if not strategy.trains:
        raise ConfigError(f"{source}: strategy '{strategy.name}' trains nothing; {name} needs a training strategy")
    _check_quantized_base(config, strategy, source)
    _check_not_compiled(config, source, section)
    if config.training.max_steps == 0:
        raise ConfigError(f"{source}: training.max_steps ({name} steps) is 0")
    if config.data.packing:
        raise ConfigError(f"{source}: data.packing does not apply to {name} prompts")
    _check_model_and_eval(config, source)
    algo = getattr(config, section)
    samples = algo.rollout_batch_size * algo.num_generations
    mb = algo.minibatch_size
    if mb is not None and samples % mb:
        raise ConfigError(f"{source}: {section}.minibatch_size {mb} does not divide the {samples} samples per step "
                          f"(rollout_batch_size x num_generations)")
    if config.grader.config is not None:
        from distributed_ft.grader.spec import load_grader_spec

        load_grader_spec(config.grader.config)  # fail before any model is loaded
    return config


def parse_ppo(raw: dict, source: str) -> PPORunConfig:
    return _parse_rl(raw, source, PPORunConfig, "ppo")


def parse_grpo(raw: dict, source: str) -> GRPORunConfig:
    return _parse_rl(raw, source, GRPORunConfig, "grpo")


def _parse_pairs(raw: dict, source: str, schema, section: str, tasks: tuple[str, ...]):
    """A preference run (DPO, reward model): pairs, a training strategy and the objective's section."""
    config, strategy = parse_run_sections(raw, source, schema)
    if config.model.task not in tasks:
        raise ConfigError(f"{source}: {section} trains {' or '.join(tasks)} models; model.task is {config.model.task}")
    if config.model.num_labels not in (None, 1):
        raise ConfigError(f"{source}: a {section} run scores with one output; model.num_labels must be 1 or unset")
    if not strategy.trains:
        raise ConfigError(f"{source}: strategy '{strategy.name}' trains nothing; {section} needs a training strategy")
    _check_quantized_base(config, strategy, source)
    _check_not_compiled(config, source, section)
    if config.training.max_steps == 0:
        raise ConfigError(f"{source}: training.max_steps is 0")
    return config


def parse_dpo(raw: dict, source: str) -> DPORunConfig:
    return _parse_pairs(raw, source, DPORunConfig, "dpo", ("causal_lm",))


def parse_rm(raw: dict, source: str) -> RMRunConfig:
    # the reward head is added to the model whatever its task says: a causal LM or a classifier folder
    config = _parse_pairs(raw, source, RMRunConfig, "rm", ("causal_lm", "sequence_classification"))
    wanted, other = ("pairs", "samples") if config.rm.objective == "pairwise" else ("samples", "pairs")
    if getattr(config, wanted) is None:
        raise ConfigError(f"{source}: rm.objective {config.rm.objective} trains on a '{wanted}' section, "
                          "which is missing")
    if getattr(config, other) is not None:
        raise ConfigError(f"{source}: rm.objective {config.rm.objective} reads '{wanted}', not '{other}'")
    return config


def parse_eval(raw: dict, source: str) -> EvalRunConfig:
    config, _ = parse_run_sections(raw, source, EvalRunConfig)
    _check_model_and_eval(config, source)
    return config


def parse_grader(raw: dict, source: str):
    from distributed_ft.grader.spec import parse_grader_spec

    return parse_grader_spec(raw, source)


# Order matters: the first kind whose marker the file has is its kind.
KINDS: dict[str, ConfigKind] = {k.name: k for k in (
    ConfigKind("grader", "a grader spec (OpenAI grader format)", parse_grader, ("type",)),
    ConfigKind("grpo", "critic-free RL (GRPO family) against a grader (dft grpo)", parse_grpo, ("grpo",)),
    ConfigKind("dpo", "preference optimisation on pairs: DPO, IPO, hinge, SimPO (dft dpo)", parse_dpo, ("dpo",)),
    ConfigKind("rm", "a pairwise reward model on preference pairs (dft rm)", parse_rm, ("rm",)),
    ConfigKind("ppo", "PPO fine-tuning against a grader (dft ppo)", parse_ppo, ("ppo", "grader")),
    ConfigKind("sft", "supervised fine-tuning with a strategy (dft train)", parse_sft, ("strategy",)),
    ConfigKind("eval", "evaluate a model on validation data (dft eval)", parse_eval, ("model",)),
)}


def detect_kind(raw: dict, source: str) -> ConfigKind:
    for kind in KINDS.values():
        if any(marker in raw for marker in kind.markers):
            return kind
    raise ConfigError(f"{source}: not a config this project reads (no {', '.join(sorted({m for k in KINDS.values() for m in k.markers}))} "
                      "section); see configs/ for examples")
