"""LoRA (and DoRA / rsLoRA) through PEFT: low-rank updates on the chosen linear layers."""
from __future__ import annotations

from typing import Literal

from pydantic import Field
from torch import nn

from distributed_ft.strategies.common import apply_peft, peft_saver, peft_task_type
from distributed_ft.strategies.registry import register
from distributed_ft.strict import StrictModel


class LoraStrategyConfig(StrictModel):
    name: Literal["lora"] = "lora"
    r: int = Field(8, gt=0)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    # "all-linear" = every linear layer except the output head (PEFT's shorthand), or explicit module names.
    target_modules: str | list[str] = "all-linear"
    use_dora: bool = False
    use_rslora: bool = False
    bias: Literal["none", "all", "lora_only"] = "none"
    # Extra modules trained in full and saved with the adapter (a classification head is added by PEFT itself).
    modules_to_save: list[str] | None = None


def apply(model: nn.Module, cfg: LoraStrategyConfig, task: str) -> nn.Module:
    from peft import LoraConfig

    peft_cfg = LoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=cfg.target_modules,
        use_dora=cfg.use_dora, use_rslora=cfg.use_rslora, bias=cfg.bias,
        modules_to_save=cfg.modules_to_save, task_type=peft_task_type(task))
    return apply_peft(model, peft_cfg, task, "lora")


register("lora", description="LoRA/DoRA/rsLoRA adapters through PEFT", config_cls=LoraStrategyConfig,
         apply=apply, save=peft_saver("lora"), quantized_base=True)
