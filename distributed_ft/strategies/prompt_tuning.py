"""Prompt tuning through PEFT: trainable soft-prompt embeddings before the input of a frozen base."""
from __future__ import annotations

from typing import Literal

from pydantic import Field
from torch import nn

from distributed_ft.errors import ConfigError
from distributed_ft.strategies.common import apply_peft, base_model_path, peft_saver, peft_task_type
from distributed_ft.strategies.registry import register
from distributed_ft.strict import StrictModel


class PromptTuningConfig(StrictModel):
    name: Literal["prompt_tuning"] = "prompt_tuning"
    num_virtual_tokens: int = Field(20, gt=0)
    prompt_tuning_init_text: str | None = None  # initialise the soft prompt from this text's embeddings
    tokenizer: str | None = None  # tokenizer for prompt_tuning_init_text; default: the model's path


def apply(model: nn.Module, cfg: PromptTuningConfig, task: str) -> nn.Module:
    from peft import PromptTuningConfig as PeftPromptTuningConfig, PromptTuningInit

    options = dict(task_type=peft_task_type(task), num_virtual_tokens=cfg.num_virtual_tokens)
    if cfg.prompt_tuning_init_text:
        tokenizer = cfg.tokenizer or base_model_path(model)
        if not tokenizer:
            raise ConfigError("strategy 'prompt_tuning': 'prompt_tuning_init_text' needs 'tokenizer' "
                              "(the model has no path to load one from)")
        options.update(prompt_tuning_init=PromptTuningInit.TEXT, prompt_tuning_init_text=cfg.prompt_tuning_init_text,
                       tokenizer_name_or_path=tokenizer)
    return apply_peft(model, PeftPromptTuningConfig(**options), task, "prompt_tuning")


register("prompt_tuning", description="trainable soft-prompt embeddings on a frozen base (PEFT)",
         config_cls=PromptTuningConfig, apply=apply, save=peft_saver("prompt_tuning"), supports_packing=False)
