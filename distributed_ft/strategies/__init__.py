"""Fine-tuning strategies, one module each, registered on import: full, selective, lora, prefix_tuning,
prompt_tuning, ia3, adapters and prompt (no training). `additive` + `method` loads as an alias."""
from distributed_ft.strategies import (adapters, full, ia3, lora, prefix_tuning, prompt,  # noqa: F401  (register)
                                       prompt_tuning, selective)
from distributed_ft.strategies.common import count_parameters
from distributed_ft.strategies.loading import load_trained
from distributed_ft.strategies.prompt import build_few_shot_records, build_prompt
from distributed_ft.strategies.registry import (Strategy, get_strategy, parse_strategy_section, register,
                                                register_alias, registered)

# The additive methods were once one strategy with a `method` option; each is a strategy of its own now.
_ADDITIVE_METHODS = {"prefix_tuning": "prefix_tuning", "prompt_tuning": "prompt_tuning", "ia3": "ia3",
                     "bottleneck": "adapters", "adapters": "adapters"}


def _resolve_additive(section: dict) -> dict:
    method = section.pop("method", None)
    if method not in _ADDITIVE_METHODS:
        raise ValueError(f"'additive' needs a 'method': one of {', '.join(sorted(_ADDITIVE_METHODS))} "
                         f"(got {method!r}); or name the strategy itself, e.g. name: ia3")
    return {**section, "name": _ADDITIVE_METHODS[method]}


register_alias("additive", _resolve_additive)

__all__ = ["Strategy", "build_few_shot_records", "build_prompt", "count_parameters", "get_strategy",
           "load_trained", "parse_strategy_section", "register", "register_alias", "registered"]
