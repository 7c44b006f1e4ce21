"""The strategy registry: a plain dict of name -> Strategy, filled by explicit register() calls."""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

from distributed_ft.config.base import StrictModel
from distributed_ft.errors import ConfigError


@dataclass(frozen=True)
class Strategy:
    name: str
    description: str
    config_cls: type[StrictModel]
    # apply(model, config, task) -> model to train; `task` is the model task
    # ("causal_lm", "sequence_classification", "regression").
    apply: Callable[[nn.Module, Any, str], nn.Module]
    trains: bool = True
    # save(model, out_dir, state_dict) writes the final model/adapter; None means model.save_pretrained.
    save: Callable[[nn.Module, str, dict | None], None] | None = None


_REGISTRY: dict[str, Strategy] = {}


def register(name: str, *, description: str, config_cls: type[StrictModel],
             apply: Callable[[nn.Module, Any, str], nn.Module], trains: bool = True,
             save: Callable[[nn.Module, str, dict | None], None] | None = None) -> Strategy:
    if name != name.lower() or not name.replace("_", "").isalnum():
        raise ValueError(f"strategy name must be lower-case letters, digits or '_': {name!r}")
    if name in _REGISTRY:
        raise ValueError(f"strategy {name!r} is already registered")
    if "name" not in config_cls.model_fields:
        raise ValueError(f"config class of strategy {name!r} needs a 'name' field")
    strategy = Strategy(name, description, config_cls, apply, trains, save)
    _REGISTRY[name] = strategy
    return strategy


def get_strategy(name: str) -> Strategy:
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"unknown strategy '{name}'{hint}; registered: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def registered() -> dict[str, Strategy]:
    return dict(sorted(_REGISTRY.items()))
