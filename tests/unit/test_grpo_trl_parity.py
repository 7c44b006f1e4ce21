"""Our GRPO-family loss equals TRL GRPOTrainer's own `_compute_loss` on one fixed batch of completions, for the
same loss type, beta and epsilons (value and gradient), and the one place the definitions differ is pinned.

TRL's method runs unchanged on a stand-in trainer object that holds just the attributes it reads; the model
forward is replaced by fixed per-token log-probs, so both sides see exactly the same numbers.
"""
from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from trl import GRPOTrainer
from trl.trainer.utils import nanstd

from distributed_ft.rl import group as G
from distributed_ft.rl.config import GRPOConfig
from distributed_ft.rl.objectives import GroupObjective

N, R, K = 8, 6, 4  # completions, completion length, generations per prompt


def batch(seed: int = 0, empty_row: bool = False):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([6, 3, 5, 1, 6, 2, 4, 6])
    mask = (torch.arange(R)[None] < lengths[:, None]).float()
    if empty_row:
        mask[3] = 0.0
    logps = -torch.rand(N, R, generator=g) * 3
    old = logps + 0.3 * torch.randn(N, R, generator=g)   # off-policy enough that both clips engage
    ref = logps + 0.2 * torch.randn(N, R, generator=g)
    rewards = torch.rand(N, generator=g)
    return mask, logps, old, ref, rewards


class Accelerator:
    num_processes = 1

    def gather(self, x):
        return x

    def reduce(self, x, reduction="sum"):
        return x


def trl_loss(loss_type: str, beta: float, eps_low: float, eps_high: float, logps, old, ref, adv, mask,
             level: str = "token") -> torch.Tensor:
    stub = SimpleNamespace(
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level=level, beta=beta,
        loss_type=loss_type, epsilon_low=eps_low, epsilon_high=eps_high, use_vllm=False,
        vllm_importance_sampling_correction=False, model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1, max_completion_length=R, accelerator=Accelerator(),
        aux_loss_enabled=False, _entropy_bonus_enabled=False, _metrics=defaultdict(lambda: defaultdict(list)),
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.zeros_like(logps), None))
    inputs = {"prompt_ids": torch.zeros(N, 2, dtype=torch.long), "prompt_mask": torch.ones(N, 2, dtype=torch.long),
              "completion_ids": torch.zeros(N, R, dtype=torch.long), "completion_mask": mask.long(),
              "advantages": adv, "old_per_token_logps": old, "ref_per_token_logps": ref,
              "num_items_in_batch": mask.sum()}
    return GRPOTrainer._compute_loss(stub, None, inputs)


def our_loss(algorithm: str, beta: float, logps, old, ref, adv, mask, **fields) -> torch.Tensor:
    cfg = GRPOConfig(algorithm=algorithm, num_generations=K, max_new_tokens=R, kl={"beta": beta}, **fields)
    objective = GroupObjective(cfg, reduce=None, eos_id=None)
    tokens = {"old_logprobs": old, "advantages": adv[:, None] * mask, "mask": mask, "ref_logprobs": ref}
    loss, _ = objective.token_loss(logps, None, torch.zeros_like(logps), tokens)
    weights, units = G.aggregation_weights(mask, cfg.loss_aggregation, R)
    return (loss * weights).sum() / units.sum()


def advantages_as_trl(rewards: torch.Tensor, scale: bool) -> torch.Tensor:
    grouped = rewards.view(-1, K)
    adv = (grouped - grouped.mean(1, keepdim=True))
    if scale:
        adv = adv / (torch.stack([nanstd(row) for row in grouped])[:, None] + 1e-4)
    return adv.reshape(-1)


CASES = [  # (our algorithm, TRL loss type, beta, eps low, eps high, TRL scales by the group std)
    ("grpo", "grpo", 0.04, 0.2, 0.2, True),
    ("grpo", "grpo", 0.0, 0.2, 0.2, True),
    ("dr_grpo", "dr_grpo", 0.04, 0.2, 0.2, False),
    ("dapo", "dapo", 0.0, 0.2, 0.28, True),
    ("dapo", "dapo", 0.04, 0.2, 0.28, True),
]


@pytest.mark.parametrize("algorithm,loss_type,beta,eps_low,eps_high,scaled", CASES)
def test_loss_and_gradient_equal_trl(algorithm, loss_type, beta, eps_low, eps_high, scaled):
    mask, logps, old, ref, rewards = batch()
    ours_adv = G.group_advantages(rewards, torch.ones(N), K,
                                  GRPOConfig(algorithm=algorithm).advantage).advantages
    trl_adv = advantages_as_trl(rewards, scaled)
    torch.testing.assert_close(ours_adv, trl_adv, rtol=1e-5, atol=1e-6)

    theirs_lp, ours_lp = logps.clone().requires_grad_(True), logps.clone().requires_grad_(True)
    theirs = trl_loss(loss_type, beta, eps_low, eps_high, theirs_lp, old, ref, trl_adv, mask)
    ours = our_loss(algorithm, beta, ours_lp, old, ref, ours_adv, mask, epsilon_low=eps_low, epsilon_high=eps_high)
    assert float(ours) == pytest.approx(float(theirs), abs=1e-5)
    theirs.backward()
    ours.backward()
    torch.testing.assert_close(ours_lp.grad, theirs_lp.grad, rtol=1e-5, atol=1e-7)
    # Both clip regions took part, so the epsilons were really compared.
    ratio = torch.exp(logps - old)
    adv_tok = ours_adv[:, None].expand_as(ratio)
    assert ((ratio > 1 + eps_high) & (adv_tok > 0) & (mask > 0)).any()
    assert ((ratio < 1 - eps_low) & (adv_tok < 0) & (mask > 0)).any()


def test_gspo_equals_trl_sequence_level_importance_sampling():
    mask, logps, old, ref, rewards = batch(seed=1)
    adv = advantages_as_trl(rewards, True)
    theirs_lp, ours_lp = logps.clone().requires_grad_(True), logps.clone().requires_grad_(True)
    theirs = trl_loss("grpo", 0.0, 3e-4, 4e-4, theirs_lp, old, ref, adv, mask, level="sequence")
    ours = our_loss("gspo", 0.0, ours_lp, old, ref, adv, mask)
    assert float(ours) == pytest.approx(float(theirs), abs=1e-6)
    theirs.backward()
    ours.backward()
    torch.testing.assert_close(ours_lp.grad, theirs_lp.grad, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("algorithm,loss_type", [("grpo", "grpo"), ("dr_grpo", "dr_grpo")])
def test_where_the_definitions_differ_a_sequence_without_tokens(algorithm, loss_type):
    """TRL's grpo and dr_grpo losses average over every sequence of the micro-batch, including one with no
    token left in the loss (here: a sample masked out, as our unscorable and dropped samples are); ours
    average over the sequences that take part. So TRL's equals ours x (sequences with tokens / all)."""
    mask, logps, old, ref, rewards = batch(seed=2, empty_row=True)
    adv = advantages_as_trl(rewards, loss_type == "grpo")
    theirs = trl_loss(loss_type, 0.04, 0.2, 0.2, logps, old, ref, adv, mask)
    ours = our_loss(algorithm, 0.04, logps, old, ref, adv, mask)
    assert float(theirs) == pytest.approx(float(ours) * (N - 1) / N, abs=1e-6)
    assert float(theirs) != pytest.approx(float(ours), abs=1e-4)
