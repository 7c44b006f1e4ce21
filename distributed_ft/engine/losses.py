"""Per-example losses for each model task, summed over tokens so global normalisation is exact."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from distributed_ft.tasks import IGNORE_INDEX


def per_example_loss(logits: torch.Tensor, labels: torch.Tensor, task: str,
                     example_of: torch.Tensor | None = None) -> torch.Tensor:
    """Sum of the loss terms of each example: shape [examples]. A causal LM's examples are its rows, or, given
    `example_of` (the example of each token, shaped like labels), the examples laid end to end in them."""
    if task == "causal_lm":
        # Additive prompt methods prepend virtual tokens to the logits; keep the real positions.
        logits = logits[:, -labels.shape[1]:]
        shifted = logits[:, :-1].float()
        targets = labels[:, 1:]
        token = F.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), targets.reshape(-1),
                                ignore_index=IGNORE_INDEX, reduction="none")
        if example_of is None:
            return token.view(targets.shape).sum(dim=1)
        return sum_by_example(token, example_of[:, 1:].reshape(-1), example_of)
    if task == "regression":
        return F.mse_loss(logits.float().view(-1), labels.float().view(-1), reduction="none")
    return F.cross_entropy(logits.float(), labels.view(-1), reduction="none")


def loss_terms(example: dict, task: str) -> int:
    """How many loss terms an example contributes (label tokens after the shift, or 1)."""
    if task != "causal_lm":
        return 1
    return sum(1 for label in example["labels"][1:] if label != IGNORE_INDEX)


def sum_by_example(values: torch.Tensor, owners: torch.Tensor, example_of: torch.Tensor) -> torch.Tensor:
    """`values` summed by example: owners holds each value's example index, example_of every token's (so an
    example without values still gets its zero)."""
    count = int(example_of.max()) + 1
    return torch.zeros(count, dtype=values.dtype, device=values.device).index_add(0, owners, values)
