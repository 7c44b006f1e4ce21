"""Full fine-tuning: every weight of the model trains."""
from __future__ import annotations

from typing import Literal

from torch import nn

from distributed_ft.config.base import StrictModel
from distributed_ft.strategies.common import check_task, save_hf_folder
from distributed_ft.strategies.registry import register


class FullConfig(StrictModel):
    name: Literal["full"] = "full"


def apply(model: nn.Module, cfg: FullConfig, task: str) -> nn.Module:
    check_task(task)
    for param in model.parameters():
        param.requires_grad_(True)
    return model


register("full", description="train every weight of the model", config_cls=FullConfig,
         apply=apply, save=save_hf_folder)
