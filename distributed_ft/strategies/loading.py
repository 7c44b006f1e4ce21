"""load_trained(): reload whatever a strategy saved (plain model folder, PEFT adapter, bottleneck adapters)."""
from __future__ import annotations

import json
import os
from typing import Any

from torch import nn

from distributed_ft.errors import ModelError
from distributed_ft.strategies import bottleneck
from distributed_ft.strategies.common import BASE_INFO_FILE
from distributed_ft.tasks import MODEL_TASKS as TASKS


def task_from_config(config: Any) -> str | None:
    """Model task from config.architectures (…ForCausalLM / …ForSequenceClassification)."""
    archs = list(getattr(config, "architectures", None) or [])
    for arch in archs:
        if arch.endswith("ForSequenceClassification"):
            return "regression" if getattr(config, "problem_type", None) == "regression" else "sequence_classification"
        if arch.endswith("ForCausalLM") or arch.endswith("LMHeadModel"):
            return "causal_lm"
    return None


def _model_class(task: str):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    return AutoModelForCausalLM if task == "causal_lm" else AutoModelForSequenceClassification


def _read_json(path: str) -> dict | None:
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def _config_from_dict(data: dict):
    from transformers import AutoConfig

    # A recorded quantization_config describes how the base was loaded, not its weights file: passed back
    # inside the config, from_pretrained would read the plain weights as already quantized.
    data = {k: v for k, v in data.items() if k not in ("transformers_version", "_name_or_path", "quantization_config")}
    return AutoConfig.for_model(data.pop("model_type"), **data)


def _saved_quantization(saved: dict | None):
    """The BitsAndBytesConfig the base was trained under (a 4-bit QLoRA base), or None."""
    recorded = ((saved or {}).get("model_config") or {}).get("quantization_config")
    if not recorded:
        return None
    from distributed_ft.models.quantization import saved_quantization_config

    return saved_quantization_config(recorded)


def _load_base(base: str | None, task: str | None, saved: dict | None, path: str, kwargs: dict,
               dequantize: bool = False) -> nn.Module:
    """The base model an adapter folder was trained on, configured as it was during training: a base trained
    in 4 bits is quantized again as it was (the same weights give the same 4-bit values), or with `dequantize`
    loaded as the plain weights those 4-bit values stand for."""
    base = base or (saved or {}).get("base_model")
    if not base:
        raise ModelError(f"{path}: the base model path is not recorded; pass base=<model folder or id>")
    config = None
    if saved and saved.get("model_config"):
        config = _config_from_dict(saved["model_config"])
    task = task or (saved or {}).get("task") or (task_from_config(config) if config else None)
    if task is None:
        from transformers import AutoConfig

        task = task_from_config(AutoConfig.from_pretrained(base)) or "causal_lm"
    if task not in TASKS:
        raise ModelError(f"{path}: unknown task '{task}'; expected one of: {', '.join(TASKS)}")
    extra = dict(kwargs)
    if config is not None:
        extra["config"] = config
    quantization = _saved_quantization(saved)
    if quantization is not None:
        extra["quantization_config"] = quantization
    try:
        model = _model_class(task).from_pretrained(base, **extra)
    except (OSError, ValueError) as err:
        raise ModelError(f"{path}: cannot load base model '{base}': {str(err).splitlines()[0]}") from None
    if quantization is not None:
        from distributed_ft.models.quantization import prepare_4bit_base

        prepare_4bit_base(model)
        if dequantize:
            model = model.dequantize()
    return model


def load_trained(path: str, base: str | None = None, task: str | None = None, *, dequantize_base: bool = False,
                 **kwargs: Any) -> nn.Module:
    """Load a trained model saved by any strategy, ready for inference (eval mode).

    - a plain model folder (config.json): AutoModelForCausalLM or AutoModelForSequenceClassification, chosen
      from config.architectures (or `task`);
    - a PEFT adapter folder (adapter_config.json): base model + peft.PeftModel.from_pretrained;
    - a bottleneck adapter folder (bottleneck_config.json): base model + adapters re-attached and loaded.
    `base` overrides the recorded base model path; extra keyword arguments go to from_pretrained (e.g. dtype).
    An adapter trained on a 4-bit base (model.load_in_4bit) goes on a base quantized again the same way, or with
    `dequantize_base` on the plain weights its 4-bit values stand for (what merging into a plain model needs).
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ModelError(f"trained model folder not found: {path}")
    if os.path.isfile(os.path.join(path, bottleneck.CONFIG_FILE)):
        meta = bottleneck.read_config(path)
        model = _load_base(base, task or meta.get("task"), meta, path, kwargs, dequantize_base)
        bottleneck.load_into(model, path)
    elif os.path.isfile(os.path.join(path, "adapter_config.json")):
        from peft import PeftModel

        saved = _read_json(os.path.join(path, BASE_INFO_FILE))
        if task is None and not saved:
            adapter_cfg = _read_json(os.path.join(path, "adapter_config.json")) or {}
            task = "sequence_classification" if adapter_cfg.get("task_type") == "SEQ_CLS" else None
            base = base or adapter_cfg.get("base_model_name_or_path")
        model = PeftModel.from_pretrained(_load_base(base, task, saved, path, kwargs, dequantize_base), path)
    elif os.path.isfile(os.path.join(path, "config.json")):
        from transformers import AutoConfig

        task = task or task_from_config(AutoConfig.from_pretrained(path))
        if task is None:
            raise ModelError(f"{path}: cannot tell the model task from config.architectures; pass task=")
        try:
            model = _model_class(task).from_pretrained(path, **kwargs)
        except (OSError, ValueError) as err:
            raise ModelError(f"{path}: cannot load model: {str(err).splitlines()[0]}") from None
    else:
        raise ModelError(f"{path}: not a model folder (no config.json, adapter_config.json or "
                         f"{bottleneck.CONFIG_FILE})")
    model.eval()
    return model


ADAPTER_FILES = ("adapter_config.json", bottleneck.CONFIG_FILE)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def resolve_trained_path(name: str) -> "Path | None":
    """A run directory means its final model; a folder with an adapter or model is used as is; else None."""
    from pathlib import Path

    path = Path(name).expanduser()
    if (path / "final").is_dir():
        path = path / "final"
    return path if path.is_dir() and any((path / m).exists() for m in ADAPTER_FILES + ("config.json",)) else None


def base_model_of(model_dir) -> str | None:
    """The base model an adapter folder records (None for a model folder)."""
    info = _read_json(os.path.join(model_dir, BASE_INFO_FILE)) or {}
    adapter = _read_json(os.path.join(model_dir, "adapter_config.json")) or {}
    return info.get("base_model") or adapter.get("base_model_name_or_path")


def load_trained_tokenizer(model_dir):
    """The tokenizer saved with a trained model, else its base model's."""
    from distributed_ft.models import load_tokenizer
    from distributed_ft.models.config import ModelConfig

    has_own = any(os.path.isfile(os.path.join(model_dir, f)) for f in TOKENIZER_FILES)
    path = str(model_dir) if has_own else base_model_of(model_dir)
    if not path:
        raise ModelError(f"{model_dir}: no tokenizer saved and no base model recorded to take one from")
    return load_tokenizer(path, ModelConfig(name_or_path=path))
