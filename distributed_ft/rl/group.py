"""The critic-free family's arithmetic as pure tensor functions: group baselines, KL estimators, overlong
shaping, the clipped surrogate (token or sequence ratio) and the loss aggregations.

A rank's samples come in whole groups: `num_generations` consecutive rows answer the same prompt, so group
statistics need no collective; only the batch-level whitening (REINFORCE++) and the loss denominators are
reduced over ranks (`reduce` sums across them). Tensors are [n] per sample or [n, R] per response token.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from distributed_ft.rl.math import Reduce, whiten

STD_EPS = 1e-4  # added to the group std (TRL's value), so a near-constant group does not explode


@dataclass
class GroupAdvantages:
    advantages: torch.Tensor   # [n]: 0 for samples that leave the update
    kept: torch.Tensor         # [n] 0/1: scorable and in a group that is not dropped
    dropped: torch.Tensor      # [groups] 0/1: fewer than two scorable samples
    constant: torch.Tensor     # [groups] 0/1: kept, but every scorable reward equal (nothing to learn)
    std: torch.Tensor          # [groups]: std of the scorable rewards (0 for dropped groups)


def group_advantages(scores: torch.Tensor, scorable: torch.Tensor, group_size: int,
                     baseline: str) -> GroupAdvantages:
    """Per-sample advantages from each group's scorable rewards. Unscorable samples leave their group's
    statistics; a group left with fewer than two scorable samples is dropped (every sample kept = 0).

    baseline: group_mean_std | group_mean | leave_one_out | group_mean_batch (the mean, whitened later) |
    batch (no baseline: the raw score, whitened later at the token level)."""
    s = scores.double().view(-1, group_size)
    ok = scorable.double().view(-1, group_size)
    count = ok.sum(1, keepdim=True)
    total = (s * ok).sum(1, keepdim=True)
    mean = total / count.clamp(min=1)
    var = (((s - mean) * ok) ** 2).sum(1, keepdim=True) / (count - 1).clamp(min=1)
    std = var.sqrt()
    enough = (count >= 2).double()
    if baseline == "batch":  # no group statistics: every scorable sample stays
        keep, adv = ok, s
    else:
        keep = ok * enough
        if baseline == "group_mean_std":
            adv = (s - mean) / (std + STD_EPS)
        elif baseline in ("group_mean", "group_mean_batch"):
            adv = s - mean
        elif baseline == "leave_one_out":
            adv = s - (total - s) / (count - 1).clamp(min=1)
        else:
            raise ValueError(f"unknown advantage baseline {baseline!r}")
    constant = (enough.squeeze(1) > 0) & (std.squeeze(1) == 0)
    return GroupAdvantages(advantages=(adv * keep).reshape(-1).to(scores.dtype), kept=keep.reshape(-1).float(),
                           dropped=1.0 - enough.squeeze(1).float(), constant=constant.float(),
                           std=(std * enough).squeeze(1).float())


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from samples of the policy (Schulman's k1, k2, k3)."""
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio ** 2
    if estimator == "k3":
        return torch.exp(-log_ratio) + log_ratio - 1.0
    raise ValueError(f"unknown KL estimator {estimator!r}")


def truncated(response: torch.Tensor, eos_id: int | None) -> torch.Tensor:
    """[n] 0/1: the completion never emitted EOS (it was cut at max_new_tokens)."""
    if eos_id is None:
        return torch.ones(response.shape[0])
    return ((response == eos_id).sum(1) == 0).float()


def overlong_penalty(lengths: torch.Tensor, max_new_tokens: int, buffer: int, penalty: float) -> torch.Tensor:
    """DAPO's soft overlong punishment: 0 up to max_new_tokens - buffer, then linear down to -penalty."""
    excess = (lengths.float() - (max_new_tokens - buffer)) / buffer
    return -penalty * excess.clamp(0.0, 1.0)


def returns_to_go(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Undiscounted sum of the rewards from each token to the end of its response (masked)."""
    rewards = rewards * mask
    return rewards.flip(1).cumsum(1).flip(1) * mask


def token_advantages(seq_advantages: torch.Tensor, mask: torch.Tensor, *, kl: torch.Tensor | None = None,
                     beta: float = 0.0, whiten_batch: bool = False, reduce: Reduce = None) -> torch.Tensor:
    """[n, R] advantages. Without a KL reward every token carries its sequence's advantage; with one (`kl` per
    token, coefficient beta) the sequence advantage is the reward of the last real token, -beta * kl the reward
    of every token, and a token's advantage is its return to go. `whiten_batch` normalises over every rank's
    tokens (REINFORCE++)."""
    if kl is None or beta == 0:
        adv = seq_advantages[:, None] * mask
    else:
        last = (mask.cumsum(1) == mask.sum(1, keepdim=True)) & (mask > 0)
        rewards = -beta * kl * mask + last.to(mask.dtype) * seq_advantages[:, None]
        adv = returns_to_go(rewards, mask)
    if whiten_batch:
        adv = whiten(adv, mask, reduce)
    return adv


def clipped_surrogate(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                      mask: torch.Tensor, epsilon_low: float, epsilon_high: float, level: str = "token"):
    """Per-token -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A) with r the token's ratio, or (GSPO, level
    "sequence") the sequence's length-normalised ratio exp(mean_t log r_t), whose gradient reaches every token.

    Returns (loss [n, R], low_clipped [n, R], high_clipped [n, R], log_ratio [n, R]); a clip counts where it
    removes the gradient: below 1 - eps_low with A < 0, above 1 + eps_high with A > 0."""
    log_ratio = logprobs - old_logprobs
    if level == "sequence":
        seq = (log_ratio * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp(min=1)
        log_ratio_used = seq.expand_as(log_ratio)
    elif level == "token":
        log_ratio_used = log_ratio
    else:
        raise ValueError(f"unknown importance ratio level {level!r}")
    ratio = torch.exp(log_ratio_used)
    clipped_ratio = torch.clamp(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high)
    loss = -torch.minimum(ratio * advantages, clipped_ratio * advantages)
    low = ((ratio < 1.0 - epsilon_low) & (advantages < 0)).to(loss.dtype)
    high = ((ratio > 1.0 + epsilon_high) & (advantages > 0)).to(loss.dtype)
    return loss, low, high, log_ratio_used


def aggregation_weights(mask: torch.Tensor, how: str, max_new_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [n, R], units [n]): a minibatch's loss is sum(weights * token_loss) / sum(units), both sums
    taken over every rank's share of the minibatch, so N ranks compute the loss one process would."""
    lengths = mask.sum(1)
    has_tokens = (lengths > 0).to(mask.dtype)
    if how == "token_mean":
        return mask, lengths
    if how == "seq_mean_token_mean":
        return mask / lengths.clamp(min=1)[:, None], has_tokens
    if how == "seq_mean_token_sum":
        return mask, has_tokens
    if how == "seq_mean_token_sum_norm":
        return mask, has_tokens * max_new_tokens
    raise ValueError(f"unknown loss aggregation {how!r}")
