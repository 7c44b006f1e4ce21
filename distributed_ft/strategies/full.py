"""Full fine-tuning: every weight of the model trains."""
from __future__ import annotations

from typing import Literal

from torch import nn

from distributed_ft.strategies.common import save_hf_folder
from distributed_ft.strategies.registry import register
from distributed_ft.strict import StrictModel
from distributed_ft.tasks import get_task


class FullConfig(StrictModel):
    name: Literal["full"] = "full"


def apply(model: nn.Module, cfg: FullConfig, task: str) -> nn.Module:
    get_task(task)  # an unknown task is a one-line error
    for param in model.parameters():
        param.requires_grad_(True)
    return model


register("full", description="train every weight of the model", config_cls=FullConfig,
         apply=apply, save=save_hf_folder)
