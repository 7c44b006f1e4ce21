"""Our pairwise losses equal TRL's own: DPOTrainer._compute_loss (sigmoid, IPO) and RewardTrainer.compute_loss
(with and without a margin), value and gradient, on one fixed batch.

TRL's methods run unchanged on a stand-in trainer holding just the attributes they read; the model forward is
replaced by fixed per-token log-probs (DPO) or fixed rewards (RM), so both sides see the same numbers.
"""
from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from trl import DPOTrainer, RewardTrainer
from trl.trainer.utils import selective_log_softmax

from distributed_ft.preference.losses import bradley_terry_loss, dpo_loss, sequence_logps
from distributed_ft.tasks import IGNORE_INDEX

B, T = 4, 7  # pairs, sequence length


class Accelerator:
    device = torch.device("cpu")

    def gather(self, x):
        return x

    gather_for_metrics = gather


def lm_batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    prompt = torch.tensor([2, 3, 1, 2, 2, 3, 1, 4])          # prompt length per row, chosen then rejected
    length = torch.tensor([7, 5, 6, 4, 6, 7, 3, 7])           # prompt + completion length per row
    pos = torch.arange(T)[None]
    completion_mask = ((pos >= prompt[:, None]) & (pos < length[:, None])).long()
    per_token = -torch.rand(2 * B, T - 1, generator=g) * 4 * completion_mask[:, 1:]
    ref = -torch.rand(2 * B, generator=g) * 10
    return completion_mask, (pos < length[:, None]).long(), per_token, ref


def trl_dpo(loss_type: str, beta: float, per_token, completion_mask, attention_mask, ref):
    outputs = SimpleNamespace(log_probs=per_token, entropy=torch.zeros_like(per_token),
                              mean_logits=torch.zeros_like(per_token), is_top1=torch.zeros_like(per_token).bool())
    stub = SimpleNamespace(model=SimpleNamespace(training=True), accelerator=Accelerator(), aux_loss_enabled=False,
                           ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
                           loss_types=[loss_type], loss_weights=[1.0], beta=beta, label_smoothing=0.0,
                           use_weighting=False, _metrics=defaultdict(lambda: defaultdict(list)),
                           _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": torch.zeros(2 * B, T, dtype=torch.long), "attention_mask": attention_mask,
              "completion_mask": completion_mask, "ref_chosen_logps": ref[:B], "ref_rejected_logps": ref[B:]}
    return DPOTrainer._compute_loss(stub, lambda **kw: outputs, inputs, return_outputs=False), stub._metrics["train"]


@pytest.mark.parametrize("loss_type,beta", [("sigmoid", 0.1), ("sigmoid", 0.5), ("ipo", 0.1), ("ipo", 1.0),
                                            ("hinge", 0.3)])
def test_dpo_loss_and_gradient_equal_trl(loss_type, beta):
    completion_mask, attention_mask, per_token, ref = lm_batch()
    theirs_lp, ours_lp = per_token.clone().requires_grad_(True), per_token.clone().requires_grad_(True)
    theirs, metrics = trl_dpo(loss_type, beta, theirs_lp, completion_mask, attention_mask, ref)
    logps, tokens = ours_lp.sum(1), completion_mask[:, 1:].sum(1)
    assert torch.equal(tokens, completion_mask.sum(1))  # every completion starts after a prompt token
    per_pair, chosen, rejected = dpo_loss(logps[:B], logps[B:], ref[:B], ref[B:], tokens[:B], tokens[B:],
                                          loss=loss_type, beta=beta)
    ours = per_pair.mean()
    assert float(ours.detach()) == pytest.approx(float(theirs.detach()), abs=1e-6)
    theirs.backward()
    ours.backward()
    torch.testing.assert_close(ours_lp.grad, theirs_lp.grad, rtol=1e-5, atol=1e-7)
    assert ours_lp.grad.abs().sum() > 0
    # the logged rewards agree too
    assert float(chosen.mean()) == pytest.approx(metrics["rewards/chosen"][0], abs=1e-5)
    assert float((chosen - rejected).mean()) == pytest.approx(metrics["rewards/margins"][0], abs=1e-5)


def test_the_ipo_normalisation_matters():
    """IPO divides each side by its completion length; the sum-form differs here, so the test above can fail."""
    completion_mask, attention_mask, per_token, ref = lm_batch()
    theirs, _ = trl_dpo("ipo", 0.1, per_token, completion_mask, attention_mask, ref)
    logps = per_token.sum(1)
    ones = torch.ones(B)
    unnormalised, _, _ = dpo_loss(logps[:B], logps[B:], ref[:B], ref[B:], ones, ones, loss="ipo", beta=0.1)
    assert abs(float(unnormalised.mean()) - float(theirs)) > 1e-2


def test_label_smoothing_is_the_conservative_mix():
    lp = torch.tensor([-3.0, -2.0]), torch.tensor([-4.0, -1.0])
    zero = torch.zeros(2), torch.zeros(2)
    plain, _, _ = dpo_loss(*lp, *zero, torch.ones(2), torch.ones(2), loss="sigmoid", beta=1.0)
    flipped, _, _ = dpo_loss(lp[1], lp[0], *zero, torch.ones(2), torch.ones(2), loss="sigmoid", beta=1.0)
    smooth, _, _ = dpo_loss(*lp, *zero, torch.ones(2), torch.ones(2), loss="sigmoid", beta=1.0, label_smoothing=0.2)
    torch.testing.assert_close(smooth, 0.8 * plain + 0.2 * flipped)


def test_simpo_is_reference_free_and_length_normalised():
    chosen, rejected = torch.tensor([-6.0]), torch.tensor([-4.0])
    n_c, n_r = torch.tensor([3]), torch.tensor([1])
    loss, r_c, r_r = dpo_loss(chosen, rejected, torch.tensor([99.0]), torch.tensor([-99.0]), n_c, n_r,
                              loss="simpo", beta=2.0, simpo_gamma=0.5)
    assert float(r_c) == pytest.approx(-4.0) and float(r_r) == pytest.approx(-8.0)
    assert float(loss) == pytest.approx(float(-torch.nn.functional.logsigmoid(torch.tensor(4.0 - 0.5))))


def test_sequence_logps_equal_trl_selective_log_softmax():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 6, 11, generator=g)
    ids = torch.randint(0, 11, (3, 6), generator=g)
    labels = ids.clone()
    labels[:, :2] = IGNORE_INDEX
    labels[2, 4:] = IGNORE_INDEX
    logps, count = sequence_logps(logits, labels)
    per_token = selective_log_softmax(logits[:, :-1], ids[:, 1:])
    mask = labels[:, 1:] != IGNORE_INDEX
    torch.testing.assert_close(logps, (per_token * mask).sum(1))
    assert count.tolist() == [4, 4, 2]


def trl_rm(rewards: torch.Tensor, margin: torch.Tensor | None, center: float | None = None):
    stub = SimpleNamespace(model=SimpleNamespace(training=True), accelerator=Accelerator(), _total_train_tokens=0,
                           _tp_size=1, _metrics=defaultdict(lambda: defaultdict(list)),
                           args=SimpleNamespace(center_rewards_coefficient=center))
    inputs = {"input_ids": torch.zeros(2 * B, 3, dtype=torch.long), "attention_mask": torch.ones(2 * B, 3)}
    if margin is not None:
        inputs["margin"] = margin
    model = lambda **kw: SimpleNamespace(logits=rewards[:, None])  # noqa: E731
    return RewardTrainer.compute_loss(stub, model, inputs), stub._metrics["train"]


@pytest.mark.parametrize("with_margin,center", [(False, None), (True, None), (True, 0.01)])
def test_bradley_terry_equals_trl_reward_trainer(with_margin, center):
    g = torch.Generator().manual_seed(1)
    rewards = torch.randn(2 * B, generator=g) * 2
    margin = torch.rand(B, generator=g) if with_margin else None
    theirs_r, ours_r = rewards.clone().requires_grad_(True), rewards.clone().requires_grad_(True)
    theirs, metrics = trl_rm(theirs_r, margin, center)
    ours = bradley_terry_loss(ours_r[:B], ours_r[B:], margin if with_margin else 0.0, center).mean()
    assert float(ours.detach()) == pytest.approx(float(theirs.detach()), abs=1e-6)
    theirs.backward()
    ours.backward()
    torch.testing.assert_close(ours_r.grad, theirs_r.grad, rtol=1e-5, atol=1e-7)
    assert metrics["accuracy"][0] == pytest.approx(float((rewards[:B] > rewards[B:]).float().mean()))
