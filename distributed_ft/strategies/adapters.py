"""Bottleneck adapter layers (Houlsby-style) after the attention and/or MLP of every block (see bottleneck.py)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field
from torch import nn

from distributed_ft.errors import ConfigError
from distributed_ft.strategies import bottleneck
from distributed_ft.strategies.common import freeze_all, head_module
from distributed_ft.strategies.registry import register
from distributed_ft.strict import StrictModel
from distributed_ft.tasks import get_task


class AdaptersConfig(StrictModel):
    name: Literal["adapters"] = "adapters"
    adapter_size: int = Field(64, gt=0)
    nonlinearity: Literal["relu", "gelu", "silu"] = "relu"
    adapter_locations: list[Literal["attention", "mlp"]] = Field(default_factory=lambda: ["attention", "mlp"],
                                                                  min_length=1)
    adapter_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    attention_module: str | None = None  # name of the attention submodule in each block (auto-detected)
    mlp_module: str | None = None  # name of the MLP submodule in each block (auto-detected)
    train_head: bool | None = None  # None = only for classification/regression (new head)


def apply(model: nn.Module, cfg: AdaptersConfig, task: str) -> nn.Module:
    train_head = cfg.train_head if cfg.train_head is not None else get_task(task).has_head
    freeze_all(model)
    bottleneck.attach(model, adapter_size=cfg.adapter_size, nonlinearity=cfg.nonlinearity,
                      locations=list(cfg.adapter_locations), dropout=cfg.adapter_dropout,
                      attention_module=cfg.attention_module, mlp_module=cfg.mlp_module)
    if train_head:
        head = head_module(model)
        if head is None:
            raise ConfigError(f"strategy 'adapters': train_head set but {type(model).__name__} has no output head")
        head[1].requires_grad_(True)
    model._dft_bottleneck = {
        "adapter_size": cfg.adapter_size, "nonlinearity": cfg.nonlinearity,
        "locations": list(cfg.adapter_locations), "dropout": cfg.adapter_dropout,
        "attention_module": cfg.attention_module, "mlp_module": cfg.mlp_module,
        "train_head": train_head, "task": task,
    }
    return model


register("adapters", description="bottleneck adapter layers after attention and MLP on a frozen base",
         config_cls=AdaptersConfig, apply=apply, save=bottleneck.save)
