"""Config loading: YAML -> overrides -> strict typed RunConfig with cross-field checks."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import yaml

from distributed_ft.config.base import StrictModel, parse_section
from distributed_ft.config.overrides import apply_overrides
from distributed_ft.errors import ConfigError, DftError

# The evaluation's name for each model task.
EVAL_TASK_TYPES = {"causal_lm": "generation", "sequence_classification": "classification",
                   "regression": "regression"}

__all__ = ["load_config", "StrictModel", "parse_section", "config_to_dict", "config_hash"]


def read_yaml(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} is not valid YAML ({getattr(err, 'problem', err)})") from None
    if raw is None:
        raise ConfigError(f"{path}: the config file is empty")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return raw


def load_sections(path: str | os.PathLike, overrides: list[str] | None, schema, required: dict[str, str] | None = None):
    """Read YAML, apply overrides, validate against `schema` with the registered strategy's own
    config model for the `strategy` section. `required` maps sections that must be present to a hint.
    Returns (config, strategy)."""
    from distributed_ft.strategies import get_strategy

    source = str(path)
    raw = apply_overrides(read_yaml(path), list(overrides or []))
    for section, hint in (required or {}).items():
        if section not in raw:
            raise ConfigError(f"{source}: missing section '{section}' ({hint})")
    strategy_raw = raw.pop("strategy", None)
    if isinstance(strategy_raw, str):
        strategy_raw = {"name": strategy_raw}
    if not isinstance(strategy_raw, dict) or "name" not in strategy_raw:
        raise ConfigError(f"{source}: section 'strategy' needs a 'name' (see `dft strategies`)")
    strategy = get_strategy(str(strategy_raw["name"]))
    strategy_cfg = parse_section(strategy.config_cls, strategy_raw, source, prefix=("strategy",))
    raw["strategy"] = {}
    config = parse_section(schema, raw, source)
    config.strategy = strategy_cfg
    return config, strategy


def load_config(path: str | os.PathLike, overrides: list[str] | None = None):
    """Read, override and validate a run config; every problem is a one-line ConfigError."""
    from distributed_ft.config.schema import RunConfig

    config, strategy = load_sections(path, overrides, RunConfig)
    _check_cross_fields(config, strategy, str(path))
    return config


def _check_cross_fields(config, strategy, source: str) -> None:
    training = config.training
    if not strategy.trains and "max_steps" in training.model_fields_set and training.max_steps > 0:
        raise ConfigError(f"{source}: strategy '{strategy.name}' trains nothing, "
                          f"but training.max_steps is {training.max_steps}; remove it or set it to 0")
    if strategy.trains and training.max_steps == 0:
        raise ConfigError(f"{source}: training.max_steps is 0 for strategy '{strategy.name}', which trains")
    if config.model.task == "causal_lm" and config.model.num_labels is not None:
        raise ConfigError(f"{source}: model.num_labels is only for sequence_classification models")
    eval_type = EVAL_TASK_TYPES[config.model.task]
    try:
        config.eval.check_task_types({spec.task_name: eval_type for spec in config.data.train})
    except DftError as err:
        raise ConfigError(f"{source}: eval.metrics: {err}") from None
    method = getattr(config.strategy, "method", None)
    if config.data.packing and method in ("prefix_tuning", "prompt_tuning"):
        raise ConfigError(f"{source}: data.packing cannot be used with additive method '{method}': its virtual "
                          "tokens drop the position_ids that keep packed examples apart; turn packing off")
    if config.model.dtype == "fp16" and training.mixed_precision == "bf16":
        raise ConfigError(f"{source}: model.dtype fp16 with training.mixed_precision bf16 mixes precisions; pick one")


def config_to_dict(config) -> dict:
    data = config.model_dump(mode="json")
    data["strategy"] = config.strategy.model_dump(mode="json")
    return data


def config_hash(config) -> str:
    text = json.dumps(config_to_dict(config), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]
