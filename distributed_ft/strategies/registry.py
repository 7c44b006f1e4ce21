"""The strategy registry: a plain dict of name -> Strategy, filled by explicit register() calls.

A strategy declares what it supports (training, packing, few-shot prompts); code elsewhere asks
these capabilities and never compares strategy names.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

from distributed_ft.errors import ConfigError
from distributed_ft.strict import StrictModel, parse_section


@dataclass(frozen=True)
class Strategy:
    name: str
    description: str
    config_cls: type[StrictModel]
    # apply(model, config, task) -> model to train; `task` is the model task (distributed_ft.tasks).
    apply: Callable[[nn.Module, Any, str], nn.Module]
    trains: bool = True
    # save(model, out_dir, state_dict) writes the final model/adapter; None means model.save_pretrained.
    save: Callable[[nn.Module, str, dict | None], None] | None = None
    # packed rows keep examples apart through position ids; virtual-token methods drop them
    supports_packing: bool = True
    # evaluation prompts are built from solved training examples (zero-/few-shot prompting)
    few_shot: bool = False
    # trains adapters on a frozen base whose linear layers may be 4-bit (model.load_in_4bit, QLoRA)
    quantized_base: bool = False


_REGISTRY: dict[str, Strategy] = {}
# Older spellings: alias -> function turning its config section into a registered strategy's.
_ALIASES: dict[str, Callable[[dict], dict]] = {}


def register(name: str, *, description: str, config_cls: type[StrictModel],
             apply: Callable[[nn.Module, Any, str], nn.Module], trains: bool = True,
             save: Callable[[nn.Module, str, dict | None], None] | None = None,
             supports_packing: bool = True, few_shot: bool = False, quantized_base: bool = False) -> Strategy:
    if name != name.lower() or not name.replace("_", "").isalnum():
        raise ValueError(f"strategy name must be lower-case letters, digits or '_': {name!r}")
    if name in _REGISTRY or name in _ALIASES:
        raise ValueError(f"strategy {name!r} is already registered")
    if "name" not in config_cls.model_fields:
        raise ValueError(f"config class of strategy {name!r} needs a 'name' field")
    strategy = Strategy(name, description, config_cls, apply, trains, save, supports_packing, few_shot,
                        quantized_base)
    _REGISTRY[name] = strategy
    return strategy


def register_alias(name: str, resolve: Callable[[dict], dict]) -> None:
    """`name` keeps loading: `resolve` rewrites its config section into a registered strategy's."""
    if name in _REGISTRY or name in _ALIASES:
        raise ValueError(f"strategy {name!r} is already registered")
    _ALIASES[name] = resolve


def get_strategy(name: str) -> Strategy:
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"unknown strategy '{name}'{hint}; registered: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def registered() -> dict[str, Strategy]:
    return dict(sorted(_REGISTRY.items()))


def parse_strategy_section(raw: Any, source: str) -> tuple[Strategy, StrictModel]:
    """The `strategy` section of a run config (a name, or a mapping with `name` and options), validated
    by the strategy's own config model. Aliases resolve first. Returns (strategy, config)."""
    if isinstance(raw, str):
        raw = {"name": raw}
    if not isinstance(raw, dict) or "name" not in raw:
        raise ConfigError(f"{source}: section 'strategy' needs a 'name' (see `dft strategies`)")
    name = str(raw["name"])
    if name in _ALIASES:
        try:
            raw = _ALIASES[name](dict(raw))
        except ValueError as err:
            raise ConfigError(f"{source}: section 'strategy': {err}") from None
        name = str(raw["name"])
    strategy = get_strategy(name)
    return strategy, parse_section(strategy.config_cls, raw, source, prefix=("strategy",))
