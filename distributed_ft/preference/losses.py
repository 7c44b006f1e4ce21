"""The pairwise losses as small pure functions of per-sequence scores (no model, no batch layout).

Every function returns per-pair values; the loop averages them over the global batch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from distributed_ft.tasks import IGNORE_INDEX


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | float = 0.0,
                       center_coefficient: float | None = None) -> torch.Tensor:
    """-log sigmoid(r_chosen - r_rejected - margin), plus the optional centring term that keeps rewards near 0."""
    loss = -F.logsigmoid(chosen - rejected - margin)
    if center_coefficient:
        loss = loss + center_coefficient * (chosen + rejected) ** 2
    return loss


def dpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, chosen_tokens, rejected_tokens,
             *, loss: str, beta: float, label_smoothing: float = 0.0, simpo_gamma: float = 0.0):
    """(per-pair loss, chosen reward, rejected reward) from summed completion log-probs.

    sigmoid: -log sigmoid(beta * delta) (label smoothing: the conservative mix with the flipped pair);
    ipo: (delta per token - 1 / (2 beta))^2 with each side's log-ratio divided by its completion length,
    as TRL does; hinge: relu(1 - beta * delta); simpo: reference-free, on length-normalised log-probs.
    """
    if loss == "simpo":
        chosen_rewards = beta * chosen_logps / chosen_tokens.clamp(min=1)
        rejected_rewards = beta * rejected_logps / rejected_tokens.clamp(min=1)
        return -F.logsigmoid(chosen_rewards - rejected_rewards - simpo_gamma), chosen_rewards, rejected_rewards
    chosen_ratio = chosen_logps - ref_chosen_logps
    rejected_ratio = rejected_logps - ref_rejected_logps
    delta = chosen_ratio - rejected_ratio
    if loss == "sigmoid":
        per_pair = -(1 - label_smoothing) * F.logsigmoid(beta * delta) - label_smoothing * F.logsigmoid(-beta * delta)
    elif loss == "ipo":
        per_token = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
        per_pair = (per_token - 1 / (2 * beta)) ** 2
    elif loss == "hinge":
        per_pair = torch.relu(1 - beta * delta)
    else:
        raise ValueError(f"unknown DPO loss {loss!r}")
    return per_pair, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the log-probs of the labelled tokens, their count) per row from full logits; labels are
    IGNORE_INDEX elsewhere."""
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    taken = torch.gather(logprobs, 2, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (taken * mask).sum(-1), labelled_tokens(labels)


def labelled_tokens(labels: torch.Tensor) -> torch.Tensor:
    """Per row, the tokens whose log-prob is taken: labels after the causal shift that are not IGNORE_INDEX."""
    return (labels[:, 1:] != IGNORE_INDEX).sum(-1)
