"""Additive methods: new trainable parameters next to a frozen base.

prefix_tuning, prompt_tuning and ia3 come from PEFT; bottleneck adapters are our own (see bottleneck.py).
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator
from torch import nn

from distributed_ft.config.base import StrictModel
from distributed_ft.errors import ConfigError
from distributed_ft.strategies import bottleneck
from distributed_ft.strategies.common import (base_model_path, check_task, freeze_all, head_module,
                                              is_classifier_task, peft_saver, peft_task_type)
from distributed_ft.strategies.registry import register

Method = Literal["prefix_tuning", "prompt_tuning", "ia3", "bottleneck"]

# Which options belong to which method; an option set for another method is refused.
_METHOD_OPTIONS: dict[str, tuple[str, ...]] = {
    "prefix_tuning": ("num_virtual_tokens", "prefix_projection", "encoder_hidden_size"),
    "prompt_tuning": ("num_virtual_tokens", "prompt_tuning_init_text", "tokenizer"),
    "ia3": ("target_modules", "feedforward_modules"),
    "bottleneck": ("adapter_size", "nonlinearity", "adapter_locations", "adapter_dropout",
                   "attention_module", "mlp_module", "train_head"),
}
# Llama-style fallback when PEFT has no IA3 default for the model type.
_IA3_TARGETS = ["k_proj", "v_proj", "down_proj"]
_IA3_FEEDFORWARD = ["down_proj"]


class AdditiveConfig(StrictModel):
    name: Literal["additive"] = "additive"
    method: Method
    # prefix_tuning / prompt_tuning
    num_virtual_tokens: int = Field(20, gt=0)
    prefix_projection: bool = False
    encoder_hidden_size: int | None = Field(None, gt=0)
    prompt_tuning_init_text: str | None = None  # initialise the soft prompt from this text's embeddings
    tokenizer: str | None = None  # tokenizer for prompt_tuning_init_text; default: the model's path
    # ia3 (None = PEFT's default for the model type, else k_proj/v_proj/down_proj)
    target_modules: list[str] | None = None
    feedforward_modules: list[str] | None = None
    # bottleneck
    adapter_size: int = Field(64, gt=0)
    nonlinearity: Literal["relu", "gelu", "silu"] = "relu"
    adapter_locations: list[Literal["attention", "mlp"]] = Field(default_factory=lambda: ["attention", "mlp"],
                                                                  min_length=1)
    adapter_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    attention_module: str | None = None  # name of the attention submodule in each block (auto-detected)
    mlp_module: str | None = None  # name of the MLP submodule in each block (auto-detected)
    train_head: bool | None = None  # None = only for classification/regression (new head)

    @model_validator(mode="after")
    def _options_fit_method(self) -> "AdditiveConfig":
        allowed = set(_METHOD_OPTIONS[self.method])
        for option in sorted(self.model_fields_set - {"name", "method"} - allowed):
            owners = [m for m, opts in _METHOD_OPTIONS.items() if option in opts]
            raise ValueError(f"option '{option}' is for method {'/'.join(owners)}, not '{self.method}'")
        if self.feedforward_modules and self.target_modules is not None:
            extra = set(self.feedforward_modules) - set(self.target_modules)
            if extra:
                raise ValueError(f"feedforward_modules {sorted(extra)} must also be in target_modules")
        return self


def _peft_config(model: nn.Module, cfg: AdditiveConfig, task: str):
    from peft import IA3Config, PrefixTuningConfig, PromptTuningConfig, PromptTuningInit

    task_type = peft_task_type(task)
    if cfg.method == "prefix_tuning":
        if is_classifier_task(task):
            # peft's sequence-classification prefix path checks for a `past_key_values` forward argument,
            # which transformers 5 models no longer declare (renamed `cache`), and fails on every batch.
            raise ConfigError(f"additive method 'prefix_tuning' is not supported for task '{task}' with the "
                              "installed peft/transformers; use prompt_tuning, ia3, bottleneck or lora")
        return PrefixTuningConfig(task_type=task_type, num_virtual_tokens=cfg.num_virtual_tokens,
                                  prefix_projection=cfg.prefix_projection,
                                  encoder_hidden_size=cfg.encoder_hidden_size or model.config.hidden_size)
    if cfg.method == "prompt_tuning":
        if cfg.prompt_tuning_init_text:
            tok = cfg.tokenizer or base_model_path(model)
            if not tok:
                raise ConfigError("additive prompt_tuning: 'prompt_tuning_init_text' needs 'tokenizer' "
                                  "(the model has no path to load one from)")
            return PromptTuningConfig(task_type=task_type, num_virtual_tokens=cfg.num_virtual_tokens,
                                      prompt_tuning_init=PromptTuningInit.TEXT,
                                      prompt_tuning_init_text=cfg.prompt_tuning_init_text,
                                      tokenizer_name_or_path=tok)
        return PromptTuningConfig(task_type=task_type, num_virtual_tokens=cfg.num_virtual_tokens)
    from peft.utils.constants import (TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as FF_MAP,
                                      TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as TARGET_MAP)

    model_type = getattr(model.config, "model_type", None)
    targets = cfg.target_modules
    feedforward = cfg.feedforward_modules
    if targets is None:
        targets = list(TARGET_MAP.get(model_type, _IA3_TARGETS))
        if feedforward is None:
            feedforward = list(FF_MAP.get(model_type, _IA3_FEEDFORWARD))
    if feedforward is None:
        feedforward = [m for m in _IA3_FEEDFORWARD if m in targets]
    return IA3Config(task_type=task_type, target_modules=targets, feedforward_modules=feedforward)


def _apply_bottleneck(model: nn.Module, cfg: AdditiveConfig, task: str) -> nn.Module:
    freeze_all(model)
    bottleneck.attach(model, adapter_size=cfg.adapter_size, nonlinearity=cfg.nonlinearity,
                      locations=list(cfg.adapter_locations), dropout=cfg.adapter_dropout,
                      attention_module=cfg.attention_module, mlp_module=cfg.mlp_module)
    train_head = cfg.train_head if cfg.train_head is not None else is_classifier_task(task)
    if train_head:
        head = head_module(model)
        if head is None:
            raise ConfigError(f"additive bottleneck: train_head set but {type(model).__name__} has no output head")
        head[1].requires_grad_(True)
    model._dft_bottleneck = {
        "adapter_size": cfg.adapter_size, "nonlinearity": cfg.nonlinearity,
        "locations": list(cfg.adapter_locations), "dropout": cfg.adapter_dropout,
        "attention_module": cfg.attention_module, "mlp_module": cfg.mlp_module,
        "train_head": train_head, "task": task,
    }
    return model


def apply(model: nn.Module, cfg: AdditiveConfig, task: str) -> nn.Module:
    check_task(task)
    if cfg.method == "bottleneck":
        return _apply_bottleneck(model, cfg, task)
    from peft import get_peft_model

    model._dft_task = task
    try:
        return get_peft_model(model, _peft_config(model, cfg, task))
    except ValueError as err:  # e.g. IA3 target modules not in the model
        raise ConfigError(f"additive {cfg.method}: {str(err).splitlines()[0]}") from None


_peft_save = peft_saver("additive")


def save(model: nn.Module, out_dir: str, state_dict: dict | None) -> None:
    if getattr(model, "_dft_bottleneck", None) is not None:
        bottleneck.save(model, out_dir, state_dict)
    else:
        _peft_save(model, out_dir, state_dict)


register("additive", description="new trainable modules on a frozen base: prefix/prompt tuning, IA3 (PEFT), "
         "bottleneck adapters", config_cls=AdditiveConfig, apply=apply, save=save)
