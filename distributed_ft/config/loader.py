"""Reading a config file: YAML -> overrides -> the kind's strict schema, with the strategy's own section."""
from __future__ import annotations

import os
from pathlib import Path

import yaml

from distributed_ft.config.overrides import apply_overrides
from distributed_ft.errors import ConfigError
from distributed_ft.strict import parse_section


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


def read_with_overrides(path: str | os.PathLike, overrides: list[str] | None) -> dict:
    return apply_overrides(read_yaml(path), list(overrides or []))


def parse_run_sections(raw: dict, source: str, schema, required: dict[str, str] | None = None):
    """Validate `raw` against `schema`; a `strategy` section is validated by the registered strategy's
    own config model. `required` maps sections that must be present to a hint. Returns (config, strategy)."""
    from distributed_ft.strategies import parse_strategy_section

    raw = dict(raw)
    for section, hint in (required or {}).items():
        if section not in raw:
            raise ConfigError(f"{source}: missing section '{section}' ({hint})")
    strategy = strategy_cfg = None
    if "strategy" in schema.model_fields:
        strategy, strategy_cfg = parse_strategy_section(raw.pop("strategy", None), source)
        raw["strategy"] = {}
    config = parse_section(schema, raw, source)
    if strategy is not None:
        config.strategy = strategy_cfg
    return config, strategy
