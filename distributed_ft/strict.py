"""Strict typed config models: unknown keys and wrong types become one-line errors.

The ground floor of every config section in the package, with the two ways a loaded config is
recorded (its plain dict and its hash).
"""
from __future__ import annotations

import difflib
import hashlib
import json
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from distributed_ft.errors import ConfigError


class StrictModel(BaseModel):
    """Base for every config section: unknown keys are refused, values are checked on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


def _model_at(model_cls: type[BaseModel] | None, loc: tuple) -> type[BaseModel] | None:
    """Walk `loc` through nested StrictModel fields to find the model that owns the last key."""
    for part in loc:
        if model_cls is None or isinstance(part, int):
            continue
        field = model_cls.model_fields.get(part)
        if field is None:
            return model_cls
        model_cls = _nested_model(field.annotation)
    return model_cls


def _nested_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _nested_model(arg)
        if found is not None:
            return found
    return None


def describe_validation_error(err: ValidationError, model_cls: type[BaseModel], source: str,
                              prefix: tuple = ()) -> str:
    """Turn pydantic's first error into one line naming the file, section, key and a suggestion."""
    first = err.errors()[0]
    loc = prefix + tuple(p for p in first["loc"])
    dotted = ".".join(str(p) for p in loc) or "<root>"
    if first["type"] == "extra_forbidden":
        key = str(loc[-1])
        section = ".".join(str(p) for p in loc[:-1]) or "top level"
        owner = _model_at(model_cls, tuple(first["loc"])[:-1])
        valid = sorted(owner.model_fields) if owner else []
        close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
        hint = f" (did you mean '{close[0]}'?)" if close else f" (valid keys: {', '.join(valid)})"
        return f"{source}: unknown key '{key}' in section '{section}'{hint}"
    if first["type"] == "missing":
        return f"{source}: missing required field '{dotted}'"
    value = first.get("input")
    msg = first["msg"].removeprefix("Value error, ")
    if isinstance(value, dict):  # a rule across the fields of one section
        return f"{source}: section '{dotted}': {msg}"
    return f"{source}: invalid value {value!r} for '{dotted}': {msg}"


def parse_section(model_cls: type[BaseModel], data: Any, source: str, prefix: tuple = ()) -> Any:
    """Validate `data` against `model_cls`, raising ConfigError with a one-line message."""
    try:
        return model_cls.model_validate(data if data is not None else {})
    except ValidationError as err:
        raise ConfigError(describe_validation_error(err, model_cls, source, prefix)) from None


def config_to_dict(config: BaseModel) -> dict:
    """The config as plain JSON data; a section typed `Any` (the registered strategy's) is dumped by its own model."""
    data = config.model_dump(mode="json")
    for name in type(config).model_fields:
        value = getattr(config, name)
        if isinstance(value, BaseModel):
            data[name] = value.model_dump(mode="json")
    return data


def config_hash(config: BaseModel | dict) -> str:
    """A short stable hash of a resolved config (or of its dict), recorded next to every result."""
    data = config if isinstance(config, dict) else config_to_dict(config)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]
