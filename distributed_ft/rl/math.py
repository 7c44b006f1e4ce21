"""PPO arithmetic as small pure tensor functions: masked statistics, GAE, losses and the KL controller.

Tensors are [batch, response_len] with a 0/1 float `mask` marking real response tokens. Functions that take a
`reduce` callable (sum over ranks) compute statistics over every rank's tokens; without one they are local.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

Reduce = Callable[[torch.Tensor], torch.Tensor] | None


def masked_mean(x: torch.Tensor, mask: torch.Tensor, reduce: Reduce = None) -> torch.Tensor:
    totals = torch.stack([(x * mask).sum(), mask.sum()]).double()
    if reduce is not None:
        totals = reduce(totals)
    return (totals[0] / totals[1].clamp(min=1)).to(x.dtype)


def masked_mean_var(x: torch.Tensor, mask: torch.Tensor, reduce: Reduce = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased variance of the masked entries (over all ranks when `reduce` sums across them)."""
    xd, md = x.double(), mask.double()
    totals = torch.stack([(xd * md).sum(), (xd * xd * md).sum(), md.sum()])
    if reduce is not None:
        totals = reduce(totals)
    s, s2, n = totals[0], totals[1], totals[2]
    mean = s / n.clamp(min=1)
    var = (s2 - n * mean * mean).clamp(min=0) / (n - 1).clamp(min=1)
    return mean.to(x.dtype), var.to(x.dtype)


def whiten(x: torch.Tensor, mask: torch.Tensor, reduce: Reduce = None, shift_mean: bool = True,
           eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the masked entries of every rank; masked-out entries become 0."""
    mean, var = masked_mean_var(x, mask, reduce)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation; returns (advantages, returns = advantages + values).

    The value after a sequence's last real token is 0 (the episode ends there); masked positions get 0.
    """
    rewards, values = rewards * mask, values * mask
    length = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(length)):
        next_value = values[:, t + 1] * mask[:, t + 1] if t + 1 < length else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * last * (mask[:, t + 1] if t + 1 < length else 0.0)
        advantages[:, t] = last
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def token_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor,
                  kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards: -kl_coef * (logp - ref_logp) everywhere, plus the score on the last real token.

    Returns (rewards, kl) with kl the per-token estimate logp - ref_logp (masked).
    """
    kl = (logprobs - ref_logprobs) * mask
    rewards = -kl_coef * kl
    last = (mask.cumsum(1) == mask.sum(1, keepdim=True)) & (mask > 0)
    rewards = rewards + last.to(rewards.dtype) * scores[:, None]
    return rewards * mask, kl


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                clip_range: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token clipped surrogate max(-A r, -A clip(r)); returns (loss, clipped (0/1), approx_kl) per token."""
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped)
    was_clipped = (clipped > unclipped).to(loss.dtype)
    approx_kl = 0.5 * (logprobs - old_logprobs) ** 2
    return loss, was_clipped, approx_kl


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
               clip_range: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token clipped value loss 0.5 * max((v - R)^2, (v_clip - R)^2); returns (loss, clipped (0/1))."""
    v_clipped = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    plain = (values - returns) ** 2
    clipped = (v_clipped - returns) ** 2
    return 0.5 * torch.maximum(plain, clipped), (clipped > plain).to(values.dtype)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(logits.float(), dim=-1)
    return torch.gather(logp, -1, tokens.unsqueeze(-1)).squeeze(-1)


class FixedKLController:
    def __init__(self, coef: float):
        self.value = coef

    def update(self, current_kl: float, n_samples: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class AdaptiveKLController(FixedKLController):
    """Ziegler et al. (2019): coef *= 1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon."""

    def __init__(self, coef: float, target: float, horizon: int):
        super().__init__(coef)
        self.target, self.horizon = target, horizon

    def update(self, current_kl: float, n_samples: int) -> None:
        if not math.isfinite(current_kl):
            return
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_samples / self.horizon


def build_kl_controller(kl_cfg) -> FixedKLController:
    if kl_cfg.adaptive:
        return AdaptiveKLController(kl_cfg.coef, kl_cfg.target, kl_cfg.horizon)
    return FixedKLController(kl_cfg.coef)
