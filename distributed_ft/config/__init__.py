"""Config files of every kind (SFT, PPO, eval, grader): read, override, validate, with one-line errors.

This package composes the sections the library packages own into whole run configs; recipes and the
CLI load configs through `load_config`.
"""
from __future__ import annotations

import os

from distributed_ft.config.kinds import KINDS, ConfigKind, detect_kind
from distributed_ft.config.loader import read_with_overrides
from distributed_ft.errors import ConfigError

__all__ = ["KINDS", "ConfigKind", "detect_kind", "load_config", "load_any"]


def load_any(path: str | os.PathLike, overrides: list[str] | None = None):
    """(kind, config) for a file of any kind, the kind told from its sections."""
    source = str(path)
    raw = read_with_overrides(path, overrides)
    kind = detect_kind(raw, source)
    return kind, kind.parse(raw, source)


def load_config(path: str | os.PathLike, overrides: list[str] | None = None, kind: str | tuple[str, ...] = "sft"):
    """Read, override and validate a config of `kind`. With several kinds, the file's sections choose among
    them; with one, the file is read as that kind, and an error says which kind the file looks like."""
    source = str(path)
    raw = read_with_overrides(path, overrides)
    found = detect_kind(raw, source)
    wanted = (kind,) if isinstance(kind, str) else tuple(kind)
    if len(wanted) > 1 and found.name not in wanted:
        names = " or ".join(f"a {w} config ({KINDS[w].description})" for w in wanted)
        raise ConfigError(f"{source}: this is a {found.name} config ({found.description}); expected {names}")
    chosen = found if found.name in wanted else KINDS[wanted[0]]
    try:
        return chosen.parse(raw, source)
    except ConfigError as err:
        if chosen is found:
            raise
        raise ConfigError(f"{err} (the file looks like a {found.name} config: {found.description})") from None
