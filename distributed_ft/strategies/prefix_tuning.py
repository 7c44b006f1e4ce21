"""Prefix tuning through PEFT: trainable key/value prefixes in every attention layer of a frozen base."""
from __future__ import annotations

from typing import Literal

from pydantic import Field
from torch import nn

from distributed_ft.errors import ConfigError
from distributed_ft.strategies.common import apply_peft, peft_saver, peft_task_type
from distributed_ft.strategies.registry import register
from distributed_ft.strict import StrictModel
from distributed_ft.tasks import get_task


class PrefixTuningConfig(StrictModel):
    name: Literal["prefix_tuning"] = "prefix_tuning"
    num_virtual_tokens: int = Field(20, gt=0)
    prefix_projection: bool = False
    encoder_hidden_size: int | None = Field(None, gt=0)


def apply(model: nn.Module, cfg: PrefixTuningConfig, task: str) -> nn.Module:
    from peft import PrefixTuningConfig as PeftPrefixTuningConfig

    if get_task(task).has_head:
        # peft's sequence-classification prefix path checks for a `past_key_values` forward argument,
        # which transformers 5 models no longer declare (renamed `cache`), and fails on every batch.
        raise ConfigError(f"strategy 'prefix_tuning' is not supported for task '{task}' with the installed "
                          "peft/transformers; use prompt_tuning, ia3, adapters or lora")
    peft_cfg = PeftPrefixTuningConfig(task_type=peft_task_type(task), num_virtual_tokens=cfg.num_virtual_tokens,
                                      prefix_projection=cfg.prefix_projection,
                                      encoder_hidden_size=cfg.encoder_hidden_size or model.config.hidden_size)
    return apply_peft(model, peft_cfg, task, "prefix_tuning")


register("prefix_tuning", description="trainable attention prefixes on a frozen base (PEFT)",
         config_cls=PrefixTuningConfig, apply=apply, save=peft_saver("prefix_tuning"), supports_packing=False)
