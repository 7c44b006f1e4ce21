"""Held-out preference figures from per-pair (chosen, rejected) scores: pairwise accuracy and mean margin."""
from __future__ import annotations

import torch


def pair_metrics(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, float]:
    """accuracy counts a tie as half a win, so a model that cannot tell the sides apart scores 0.5."""
    margin = (chosen - rejected).double()
    if margin.numel() == 0:
        return {"pairs": 0}
    accuracy = ((margin > 0).double() + 0.5 * (margin == 0).double()).mean()
    return {"pairs": int(margin.numel()), "accuracy": float(accuracy), "margin": float(margin.mean()),
            "chosen": float(chosen.double().mean()), "rejected": float(rejected.double().mean())}


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Average ranks (ties share their mean rank), as Spearman's coefficient needs."""
    order = torch.argsort(x, stable=True)
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(len(x), dtype=x.dtype)
    for value in torch.unique(x):
        tied = x == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a - a.mean(), b - b.mean()
    denominator = (a.norm() * b.norm()).item()
    return float((a * b).sum() / denominator) if denominator > 0 else 0.0


def agreement_metrics(predicted: torch.Tensor, source: torch.Tensor, threshold: float) -> dict[str, float]:
    """How a pointwise grader agrees with the grader whose scores it learned, on held-out samples."""
    p, s = predicted.double(), source.double()
    return {"samples": int(p.numel()), "pearson": _pearson(p, s), "spearman": _pearson(_ranks(p), _ranks(s)),
            "mae": float((p - s).abs().mean()), "accuracy": float(((p >= threshold) == (s >= threshold)).double().mean())}
