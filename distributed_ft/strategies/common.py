"""Helpers shared by the strategies: freezing, parameter counts, block discovery and saving."""
from __future__ import annotations

import json
import math
import os

from torch import nn

from distributed_ft.errors import ConfigError
from distributed_ft.tasks import get_task

# Written next to every adapter folder so the base model can be rebuilt exactly (task, labels, pad id).
BASE_INFO_FILE = "base_model.json"


def peft_task_type(task: str):
    from peft import TaskType

    return TaskType.SEQ_CLS if get_task(task).has_head else TaskType.CAUSAL_LM


def apply_peft(model: nn.Module, peft_config, task: str, strategy: str) -> nn.Module:
    """Wrap `model` with a PEFT method; a config PEFT refuses (e.g. absent target modules) is one line."""
    from peft import get_peft_model

    model._dft_task = task
    try:
        return get_peft_model(model, peft_config)
    except ValueError as err:
        raise ConfigError(f"strategy '{strategy}': {str(err).splitlines()[0]}") from None


def numel(param: nn.Parameter) -> int:
    # Under DeepSpeed ZeRO-3 the local tensor is an empty shard; ds_numel is the real size. A bitsandbytes 4-bit
    # weight packs two values a byte; its quant_state holds the real shape.
    quant_state = getattr(param, "quant_state", None)
    if quant_state is not None and getattr(quant_state, "shape", None) is not None:
        return int(math.prod(quant_state.shape))
    return int(getattr(param, "ds_numel", param.numel()))


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """Return (trainable, total) parameter counts; tied parameters are counted once."""
    trainable = total = 0
    for param in model.parameters():  # parameters() already yields each shared tensor once
        n = numel(param)
        total += n
        if param.requires_grad:
            trainable += n
    return trainable, total


def freeze_all(model: nn.Module) -> None:
    for param in model.parameters():
        param.requires_grad_(False)


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The transformer block list: the largest nn.ModuleList whose children all share one class."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        if best is None or len(module) > len(best[1]):
            best = (name, module)
    if best is None:
        raise ConfigError(f"cannot find the transformer block list in {type(model).__name__} "
                          "(no nn.ModuleList of identical blocks)")
    return best


def head_module(model: nn.Module) -> tuple[str, nn.Module] | None:
    """The output head: lm_head (output embeddings) or a classification head (score/classifier)."""
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    candidates = [out] if out is not None else []
    candidates += [getattr(model, n) for n in ("score", "classifier") if isinstance(getattr(model, n, None), nn.Module)]
    for cand in candidates:
        for name, module in model.named_modules():
            if module is cand:
                return name, module
    return None


def base_model_path(model: nn.Module) -> str | None:
    """Where the base weights came from (set by from_pretrained), or None for a model built in memory."""
    path = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    return str(path) if path else None


def write_base_info(model: nn.Module, out_dir: str, task: str, strategy: str) -> None:
    """Record task, base path and the base config (labels, pad id) for load_trained."""
    config = model.config.to_dict()
    info = {"strategy": strategy, "task": task, "base_model": base_model_path(model), "model_config": config}
    with open(os.path.join(out_dir, BASE_INFO_FILE), "w", encoding="utf-8") as fh:
        json.dump(info, fh, indent=2, sort_keys=True, default=str)


def save_hf_folder(model: nn.Module, out_dir: str, state_dict: dict | None) -> None:
    """A plain Hugging Face model folder (config.json + safetensors weights)."""
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir, state_dict=state_dict)


def peft_saver(strategy: str):
    """Save hook for PEFT models: an adapter folder that peft.PeftModel.from_pretrained loads."""

    def save(model: nn.Module, out_dir: str, state_dict: dict | None) -> None:
        os.makedirs(out_dir, exist_ok=True)
        model.save_pretrained(out_dir, state_dict=state_dict, safe_serialization=True)
        base = model.get_base_model()
        write_base_info(base, out_dir, _task_of(model), strategy)

    return save


def _task_of(peft_model: nn.Module) -> str:
    base = peft_model.get_base_model()
    task = getattr(base, "_dft_task", None)
    if task:
        return task
    task_type = str(getattr(peft_model.peft_config[peft_model.active_adapter], "task_type", ""))
    if "SEQ_CLS" in task_type:
        return "regression" if base.config.problem_type == "regression" else "sequence_classification"
    return "causal_lm"
