"""Bottleneck adapters (Houlsby-style): down-project, nonlinearity, up-project, residual add.

Adapters are real submodules of each transformer block (attribute `bottleneck_adapters`, so DeepSpeed ZeRO-3
partitions and gathers them like any other parameter) and are applied by forward hooks on the block's attention
and/or MLP module, so the base model's parameter names stay unchanged. The up-projection starts at zero: a freshly
attached model computes exactly what the base model computes.
"""
from __future__ import annotations

import json
import os
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from distributed_ft.errors import ConfigError, ModelError
from distributed_ft.strategies.common import base_model_path, find_blocks, head_module

ADAPTER_ATTR = "bottleneck_adapters"
WEIGHTS_FILE = "bottleneck_adapters.safetensors"
CONFIG_FILE = "bottleneck_config.json"
FORMAT_VERSION = 1

_ATTENTION_NAMES = ("self_attn", "attention", "attn", "self_attention")
_MLP_NAMES = ("mlp", "feed_forward", "ffn")
_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}


class BottleneckAdapter(nn.Module):
    """h -> h + up(act(down(h)))."""

    def __init__(self, hidden_size: int, adapter_size: int, nonlinearity: str, dropout: float = 0.0,
                 dtype: torch.dtype | None = None):
        super().__init__()
        self.down = nn.Linear(hidden_size, adapter_size, dtype=dtype)
        self.act = _ACTIVATIONS[nonlinearity]()
        self.dropout = nn.Dropout(dropout)
        self.up = nn.Linear(adapter_size, hidden_size, dtype=dtype)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + self.up(self.dropout(self.act(self.down(hidden))))


def _hook(adapter: BottleneckAdapter):
    def hook(_module, _inputs, output):
        # Attention modules return (hidden, weights, ...); MLPs return a tensor.
        if isinstance(output, tuple):
            return (adapter(output[0]),) + tuple(output[1:])
        return adapter(output)

    return hook


def _sub_module(block: nn.Module, location: str, explicit: str | None) -> tuple[str, nn.Module]:
    names = (explicit,) if explicit else (_ATTENTION_NAMES if location == "attention" else _MLP_NAMES)
    for name in names:
        try:
            return name, block.get_submodule(name)
        except AttributeError:
            continue
    option = "attention_module" if location == "attention" else "mlp_module"
    children = ", ".join(n for n, _ in block.named_children())
    raise ConfigError(f"bottleneck adapter: no {location} module named {'/'.join(names)} in "
                      f"{type(block).__name__} (children: {children}); set '{option}'")


def attach(model: nn.Module, *, adapter_size: int, nonlinearity: str, locations: list[str],
           dropout: float = 0.0, attention_module: str | None = None, mlp_module: str | None = None) -> list[str]:
    """Add adapters to every block of `model` in place; returns the module names they hook."""
    hidden = getattr(model.config, "hidden_size", None)
    if not hidden:
        raise ConfigError(f"bottleneck adapter: {type(model).__name__}.config has no hidden_size")
    dtype = next(model.parameters()).dtype
    _, blocks = find_blocks(model)
    hooked: list[str] = []
    for block in blocks:
        if hasattr(block, ADAPTER_ATTR):
            raise ConfigError("bottleneck adapter: the model already has bottleneck adapters")
        adapters = nn.ModuleDict()
        for loc in locations:
            sub_name, sub = _sub_module(block, loc, attention_module if loc == "attention" else mlp_module)
            adapters[loc] = BottleneckAdapter(hidden, adapter_size, nonlinearity, dropout, dtype=dtype)
            sub.register_forward_hook(_hook(adapters[loc]))
            hooked.append(sub_name)
        block.add_module(ADAPTER_ATTR, adapters)
    return sorted(set(hooked))


def adapter_state(model: nn.Module, state_dict: dict | None, include_head: bool) -> dict[str, torch.Tensor]:
    """The adapter (and optionally head) tensors, from `state_dict` when given (ZeRO-3 gathered) else the model."""
    full = state_dict if state_dict is not None else model.state_dict()
    keep = [f".{ADAPTER_ATTR}."]
    head = head_module(model) if include_head else None
    head_prefix = f"{head[0]}." if head else None
    out = {}
    for key, value in full.items():
        if any(k in key for k in keep) or (head_prefix and key.startswith(head_prefix)):
            out[key] = value.detach().to("cpu").contiguous()
    return out


def save(model: nn.Module, out_dir: str, state_dict: dict | None) -> None:
    """Write adapter weights (safetensors) and bottleneck_config.json; see load()."""
    meta = getattr(model, "_dft_bottleneck", None)
    if meta is None:
        raise ModelError("bottleneck save: the model has no bottleneck adapters attached")
    os.makedirs(out_dir, exist_ok=True)
    tensors = adapter_state(model, state_dict, meta["train_head"])
    save_file(tensors, os.path.join(out_dir, WEIGHTS_FILE), metadata={"format": "pt"})
    config = dict(meta, format_version=FORMAT_VERSION, base_model=base_model_path(model),
                  model_config=model.config.to_dict())
    with open(os.path.join(out_dir, CONFIG_FILE), "w", encoding="utf-8") as fh:
        json.dump(config, fh, indent=2, sort_keys=True, default=str)


def read_config(path: str) -> dict:
    with open(os.path.join(path, CONFIG_FILE), encoding="utf-8") as fh:
        return json.load(fh)


def load_into(model: nn.Module, path: str) -> nn.Module:
    """Attach adapters described by `path`/bottleneck_config.json to `model` and load their weights."""
    meta = read_config(path)
    attach(model, adapter_size=meta["adapter_size"], nonlinearity=meta["nonlinearity"],
           locations=meta["locations"], dropout=meta.get("dropout", 0.0),
           attention_module=meta.get("attention_module"), mlp_module=meta.get("mlp_module"))
    model._dft_bottleneck = {k: meta[k] for k in _META_KEYS if k in meta}
    tensors = load_file(os.path.join(path, WEIGHTS_FILE))
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    adapter_missing = [k for k in missing if f".{ADAPTER_ATTR}." in k]
    if unexpected or adapter_missing:
        bad = (unexpected or adapter_missing)[0]
        raise ModelError(f"{path}: adapter weights do not fit the base model (e.g. '{bad}')")
    return model


_META_KEYS = ("adapter_size", "nonlinearity", "locations", "dropout", "attention_module", "mlp_module",
              "train_head", "task")
