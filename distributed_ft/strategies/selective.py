"""Selective fine-tuning: freeze everything, then unfreeze the blocks/parameters the config names."""
from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator
from torch import nn

from distributed_ft.errors import ConfigError
from distributed_ft.strategies.common import find_blocks, freeze_all, head_module, save_hf_folder
from distributed_ft.strategies.registry import register
from distributed_ft.strict import StrictModel
from distributed_ft.tasks import get_task

_SELECTORS = ("layers", "top_k", "bottom_k", "patterns", "biases", "norms", "head", "embeddings")


class SelectiveConfig(StrictModel):
    name: Literal["selective"] = "selective"
    layers: list[int] = Field(default_factory=list)  # block indices; negatives count from the last block
    top_k: int = Field(0, ge=0)  # the last k blocks (nearest the output)
    bottom_k: int = Field(0, ge=0)  # the first k blocks (nearest the embeddings)
    patterns: list[str] = Field(default_factory=list)  # regexes searched in parameter names
    biases: bool = False  # BitFit
    norms: bool = False
    # None = train the head only for classification/regression, whose head is newly initialised.
    head: bool | None = None
    embeddings: bool = False

    @field_validator("patterns")
    @classmethod
    def _compile(cls, patterns: list[str]) -> list[str]:
        for pat in patterns:
            try:
                re.compile(pat)
            except re.error as err:
                raise ValueError(f"invalid regex {pat!r}: {err}") from None
        return patterns


def _selected(cfg: SelectiveConfig) -> list[str]:
    return [s for s in _SELECTORS if getattr(cfg, s) not in (None, False, 0, [])]


def _block_params(model: nn.Module, cfg: SelectiveConfig) -> tuple[dict[str, list], str]:
    """Parameters of the chosen blocks, per selector."""
    found: dict[str, list] = {}
    if not (cfg.layers or cfg.top_k or cfg.bottom_k):
        return found, ""
    list_name, blocks = find_blocks(model)
    n = len(blocks)
    for idx in cfg.layers:
        if not -n <= idx < n:
            raise ConfigError(f"strategy 'selective': layer index {idx} out of range "
                              f"(model has {n} blocks in '{list_name}', valid -{n}..{n - 1})")
    for sel, count in (("top_k", cfg.top_k), ("bottom_k", cfg.bottom_k)):
        if count > n:
            raise ConfigError(f"strategy 'selective': {sel}={count} but the model has only {n} blocks")
    chosen = {
        "layers": sorted({i % n for i in cfg.layers}),
        "top_k": list(range(n - cfg.top_k, n)),
        "bottom_k": list(range(cfg.bottom_k)),
    }
    for sel, idxs in chosen.items():
        if idxs:
            found[sel] = [p for i in idxs for p in blocks[i].parameters()]
    return found, list_name


def select_parameters(model: nn.Module, cfg: SelectiveConfig, task: str) -> list[nn.Parameter]:
    """The parameters the config selects; ConfigError when a selector matches nothing."""
    get_task(task)  # an unknown task is a one-line error
    if not _selected(cfg):
        raise ConfigError("strategy 'selective' selects nothing: set at least one of " + ", ".join(_SELECTORS))
    found, _ = _block_params(model, cfg)
    named = list(model.named_parameters())
    if cfg.patterns:
        for pat in cfg.patterns:
            hits = [p for n, p in named if re.search(pat, n)]
            if not hits:
                raise ConfigError(f"strategy 'selective': pattern {pat!r} matches no parameter name "
                                  f"(e.g. '{named[0][0]}')")
            found.setdefault("patterns", []).extend(hits)
    if cfg.biases:
        found["biases"] = [p for n, p in named if n.rsplit(".", 1)[-1] == "bias"]
    if cfg.norms:
        found["norms"] = [p for m in model.modules() if "norm" in type(m).__name__.lower()
                          for p in m.parameters(recurse=False)]
    train_head = cfg.head if cfg.head is not None else get_task(task).has_head
    if train_head:
        head = head_module(model)
        found["head"] = list(head[1].parameters()) if head else []
    if cfg.embeddings:
        emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        found["embeddings"] = list(emb.parameters()) if emb is not None else []
    what = {"biases": "bias parameters", "norms": "normalisation layers with parameters",
            "head": "output head (lm_head/score/classifier)", "embeddings": "input embeddings"}
    for sel, params in found.items():
        if not params and (sel != "head" or cfg.head):
            raise ConfigError(f"strategy 'selective': '{sel}' selected but {type(model).__name__} "
                              f"has no {what.get(sel, 'matching parameters')}")
    unique: dict[int, nn.Parameter] = {}
    for params in found.values():
        for p in params:
            unique[id(p)] = p
    return list(unique.values())


def apply(model: nn.Module, cfg: SelectiveConfig, task: str) -> nn.Module:
    params = select_parameters(model, cfg, task)
    freeze_all(model)
    for p in params:
        p.requires_grad_(True)
    return model


register("selective", description="train only the chosen blocks/parameters (layers, BitFit, norms, head, ...)",
         config_cls=SelectiveConfig, apply=apply, save=save_hf_folder)
