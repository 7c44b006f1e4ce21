"""IA3 through PEFT: learned per-channel scaling of keys, values and feed-forward activations."""
from __future__ import annotations

from typing import Literal

from pydantic import model_validator
from torch import nn

from distributed_ft.strategies.common import apply_peft, peft_saver, peft_task_type
from distributed_ft.strategies.registry import register
from distributed_ft.strict import StrictModel

# Llama-style fallback when PEFT has no IA3 default for the model type.
_IA3_TARGETS = ["k_proj", "v_proj", "down_proj"]
_IA3_FEEDFORWARD = ["down_proj"]


class IA3StrategyConfig(StrictModel):
    name: Literal["ia3"] = "ia3"
    # None = PEFT's default for the model type, else k_proj/v_proj/down_proj
    target_modules: list[str] | None = None
    feedforward_modules: list[str] | None = None

    @model_validator(mode="after")
    def _feedforward_is_targeted(self) -> "IA3StrategyConfig":
        if self.feedforward_modules and self.target_modules is not None:
            extra = set(self.feedforward_modules) - set(self.target_modules)
            if extra:
                raise ValueError(f"feedforward_modules {sorted(extra)} must also be in target_modules")
        return self


def target_modules(model: nn.Module, cfg: IA3StrategyConfig) -> tuple[list[str], list[str]]:
    """(target modules, feed-forward modules): the config's, else PEFT's defaults for the model type."""
    from peft.utils.constants import (TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as FF_MAP,
                                      TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as TARGET_MAP)

    model_type = getattr(model.config, "model_type", None)
    targets, feedforward = cfg.target_modules, cfg.feedforward_modules
    if targets is None:
        targets = list(TARGET_MAP.get(model_type, _IA3_TARGETS))
        if feedforward is None:
            feedforward = list(FF_MAP.get(model_type, _IA3_FEEDFORWARD))
    if feedforward is None:
        feedforward = [m for m in _IA3_FEEDFORWARD if m in targets]
    return targets, feedforward


def apply(model: nn.Module, cfg: IA3StrategyConfig, task: str) -> nn.Module:
    from peft import IA3Config

    targets, feedforward = target_modules(model, cfg)
    peft_cfg = IA3Config(task_type=peft_task_type(task), target_modules=targets, feedforward_modules=feedforward)
    return apply_peft(model, peft_cfg, task, "ia3")


register("ia3", description="IA3: learned scaling of keys, values and feed-forward activations (PEFT)",
         config_cls=IA3StrategyConfig, apply=apply, save=peft_saver("ia3"))
