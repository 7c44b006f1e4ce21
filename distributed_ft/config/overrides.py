"""Command-line overrides `key.sub=value` applied to the raw YAML mapping before validation."""
from __future__ import annotations

from typing import Any

import yaml

from distributed_ft.errors import ConfigError


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override '{item}' is not of the form key.sub=value")
        try:
            value = yaml.safe_load(text) if text else ""
        except yaml.YAMLError:
            value = text
        _set_path(raw, key.split("."), value, item)
    return raw


def _set_path(node: Any, parts: list[str], value: Any, item: str) -> None:
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"override '{item}': '{part}' is not an index of a list of {len(node)}")
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {})
                if node is None:
                    raise ConfigError(f"override '{item}': '{part}' is empty in the config")
        else:
            raise ConfigError(f"override '{item}': '{'.'.join(parts[:i])}' is not a section")
