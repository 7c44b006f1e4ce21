"""Fine-tuning strategies (full, lora, selective, additive, prompt), registered on import."""
from distributed_ft.strategies import additive, full, lora, prompt, selective  # noqa: F401  (register)
from distributed_ft.strategies.common import count_parameters
from distributed_ft.strategies.loading import load_trained
from distributed_ft.strategies.prompt import build_prompt
from distributed_ft.strategies.registry import Strategy, get_strategy, register, registered

__all__ = ["Strategy", "build_prompt", "count_parameters", "get_strategy", "load_trained", "register",
           "registered"]
