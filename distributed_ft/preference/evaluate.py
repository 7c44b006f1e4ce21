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


def calibration_bins(predicted: torch.Tensor, source: torch.Tensor, bins: int = 10) -> list[dict[str, float]]:
    """Held-out samples sorted by predicted score and cut into `bins` bins of (nearly) equal count: each bin's
    mean predicted score against its mean source score. Equal counts, not equal widths: the scores cluster
    (exact outputs all score 1.0), and a bin of one or two samples would only plot noise."""
    order = torch.argsort(predicted.double(), stable=True)
    out = []
    for part in torch.tensor_split(order, min(bins, len(order))):
        out.append({"predicted": float(predicted[part].double().mean()), "source": float(source[part].double().mean()),
                    "samples": int(part.numel())})
    return out


def plot_calibration(path, predicted: torch.Tensor, source: torch.Tensor, bins: list[dict], title: str) -> None:
    """A PNG: every held-out sample (faint), the binned means and the diagonal a calibrated grader follows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(predicted.tolist(), source.tolist(), s=6, alpha=0.25, color="tab:gray", label="held-out samples")
    ax.plot([b["predicted"] for b in bins], [b["source"] for b in bins], "o-", color="tab:blue",
            label=f"mean of {len(bins)} equal-count bins")
    low = min(float(predicted.min()), float(source.min()))
    high = max(float(predicted.max()), float(source.max()))
    ax.plot([low, high], [low, high], "--", color="black", linewidth=1, label="calibrated (y = x)")
    ax.set_xlabel("predicted score (trained grader)")
    ax.set_ylabel("source grader score")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
