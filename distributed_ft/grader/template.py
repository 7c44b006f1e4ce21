"""`{{ item.x }}` / `{{ sample.output_text }}` substitution; a missing field is a per-sample TemplateError."""
from __future__ import annotations

import json
import re
from typing import Any

_TAG = re.compile(r"\{\{\s*(.*?)\s*\}\}")
_PART = re.compile(r"([^.\[\]]+)|\[(\d+)\]")
NAMESPACES = ("item", "sample")


class TemplateError(ValueError):
    """A template names a field that the sample or item does not have (the sample becomes unscorable)."""


def _parse_path(expr: str) -> list[str | int]:
    parts: list[str | int] = []
    pos = 0
    while pos < len(expr):
        if expr[pos] == ".":
            pos += 1
            continue
        match = _PART.match(expr, pos)
        if not match:
            raise TemplateError(f"bad template variable '{{{{ {expr} }}}}'")
        parts.append(match.group(1) if match.group(1) is not None else int(match.group(2)))
        pos = match.end()
    return parts


def check_template(text: str, where: str) -> None:
    """Raise ValueError if a `{{ }}` tag in `text` is not `namespace.path` with namespace item or sample."""
    for match in _TAG.finditer(text):
        expr = match.group(1)
        try:
            path = _parse_path(expr)
        except TemplateError as err:
            raise ValueError(f"{where}: {err}") from None
        if not path or path[0] not in NAMESPACES:
            raise ValueError(f"{where}: template '{{{{ {expr} }}}}' must start with item. or sample.")


def lookup(expr: str, context: dict[str, Any]) -> Any:
    """Value at a dotted path such as `item.answer.0` or `sample.output_json.key`."""
    path = _parse_path(expr)
    if not path or path[0] not in NAMESPACES:
        raise TemplateError(f"template '{{{{ {expr} }}}}' must start with item. or sample.")
    value: Any = context.get(path[0])
    walked = str(path[0])
    for key in path[1:]:
        if isinstance(value, dict) and str(key) in value:
            value = value[str(key)]
        elif isinstance(value, list) and isinstance(key, int) and -len(value) <= key < len(value):
            value = value[key]
        elif isinstance(value, list) and isinstance(key, str) and key.isdigit() and int(key) < len(value):
            value = value[int(key)]
        else:
            raise TemplateError(f"template '{{{{ {expr} }}}}': {walked} has no field '{key}'")
        walked = f"{walked}.{key}"
    if value is None:
        raise TemplateError(f"template '{{{{ {expr} }}}}': {walked} is null")
    return value


def render(text: str, sample: dict[str, Any], item: dict[str, Any]) -> str:
    """Substitute every `{{ }}` tag; strings go in as they are, other values as JSON."""
    if "{{" not in text:
        return text
    context = {"item": item, "sample": sample}

    def _sub(match: re.Match) -> str:
        value = lookup(match.group(1), context)
        return value if isinstance(value, str) else json.dumps(value)

    return _TAG.sub(_sub, text)
