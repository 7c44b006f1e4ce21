"""Per-example losses for each model task, summed over tokens so global normalisation is exact."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from distributed_ft.tasks import IGNORE_INDEX


def per_example_loss(logits: torch.Tensor, labels: torch.Tensor, task: str) -> torch.Tensor:
    """Sum of the loss terms of each example: shape [batch]."""
    if task == "causal_lm":
        # Additive prompt methods prepend virtual tokens to the logits; keep the real positions.
        logits = logits[:, -labels.shape[1]:]
        shifted = logits[:, :-1].float()
        targets = labels[:, 1:]
        token = F.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), targets.reshape(-1),
                                ignore_index=IGNORE_INDEX, reduction="none")
        return token.view(targets.shape).sum(dim=1)
    if task == "regression":
        return F.mse_loss(logits.float().view(-1), labels.float().view(-1), reduction="none")
    return F.cross_entropy(logits.float(), labels.view(-1), reduction="none")


def loss_terms(example: dict, task: str) -> int:
    """How many loss terms an example contributes (label tokens after the shift, or 1)."""
    if task != "causal_lm":
        return 1
    return sum(1 for label in example["labels"][1:] if label != IGNORE_INDEX)
