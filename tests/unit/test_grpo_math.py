"""The critic-free family's arithmetic against values worked out by hand on small batches."""
from __future__ import annotations

import math

import pytest
import torch

from distributed_ft.rl import group as G

# Three groups of four: one with an unscorable sample, one constant, one left with a single scorable sample.
SCORES = torch.tensor([1.0, 0.0, 0.5, 0.0, 1.0, 1.0, 1.0, 1.0, 0.2, 0.0, 0.0, 0.0])
SCORABLE = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0])


def test_group_mean_std_leaves_unscorable_out_and_drops_thin_groups():
    g = G.group_advantages(SCORES, SCORABLE, 4, "group_mean_std")
    # group 0 over its three scorable rewards: mean 0.5, unbiased std sqrt((0.25 + 0.25 + 0) / 2) = 0.5
    expected = [0.5 / (0.5 + 1e-4), -0.5 / (0.5 + 1e-4), 0.0, 0.0] + [0.0] * 8
    assert g.advantages.tolist() == pytest.approx(expected, abs=1e-6)
    assert g.kept.tolist() == [1, 1, 1, 0, 1, 1, 1, 1, 0, 0, 0, 0]
    assert g.dropped.tolist() == [0, 0, 1] and g.constant.tolist() == [0, 1, 0]
    assert g.std.tolist() == pytest.approx([0.5, 0.0, 0.0])


def test_group_mean_and_leave_one_out_baselines():
    mean_only = G.group_advantages(SCORES, SCORABLE, 4, "group_mean").advantages[:4]
    assert mean_only.tolist() == pytest.approx([0.5, -0.5, 0.0, 0.0])
    loo = G.group_advantages(SCORES, SCORABLE, 4, "leave_one_out").advantages[:4]
    # r_i minus the mean of the other scorable rewards: 1 - 0.25, 0 - 0.75, 0.5 - 0.5
    assert loo.tolist() == pytest.approx([0.75, -0.75, 0.0, 0.0])
    assert G.group_advantages(SCORES, SCORABLE, 4, "leave_one_out").kept[8:].sum() == 0


def test_batch_baseline_keeps_every_scorable_sample():
    g = G.group_advantages(SCORES, SCORABLE, 4, "batch")
    assert g.kept.tolist() == SCORABLE.tolist()  # no group statistics: a lone scorable sample stays
    assert g.advantages.tolist() == pytest.approx((SCORES * SCORABLE).tolist())


def test_kl_estimators():
    lp, ref = torch.tensor([0.0]), torch.tensor([-0.5])  # log ratio 0.5
    assert G.kl_estimate(lp, ref, "k1").item() == pytest.approx(0.5)
    assert G.kl_estimate(lp, ref, "k2").item() == pytest.approx(0.125)
    assert G.kl_estimate(lp, ref, "k3").item() == pytest.approx(math.exp(-0.5) + 0.5 - 1)


def test_kl_in_the_reward_gives_returns_to_go():
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    kl = torch.tensor([[0.1, 0.2, 0.3, 9.0]])
    adv = G.token_advantages(torch.tensor([2.0]), mask, kl=kl, beta=0.5)
    # token rewards -0.05, -0.1, -0.15 + 2 (the score on the last real token); returns to go from each token
    assert adv.tolist()[0] == pytest.approx([1.7, 1.75, 1.85, 0.0])
    plain = G.token_advantages(torch.tensor([2.0]), mask)
    assert plain.tolist()[0] == [2.0, 2.0, 2.0, 0.0]


def test_batch_whitening_of_token_advantages():
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    adv = G.token_advantages(torch.tensor([1.0, -2.0]), mask, whiten_batch=True)
    values = torch.tensor([1.0, 1.0, -2.0])  # the three real tokens
    expected = (values - values.mean()) / values.std()
    assert adv[mask > 0].tolist() == pytest.approx(expected.tolist(), abs=1e-6)
    assert adv[mask == 0].tolist() == [0.0, 0.0, 0.0]


def test_asymmetric_clipping_and_its_fractions():
    old = torch.zeros(1, 3)
    lp = torch.log(torch.tensor([[1.5, 0.5, 1.1]]))
    adv = torch.tensor([[1.0, -1.0, -1.0]])
    loss, low, high, _ = G.clipped_surrogate(lp, old, adv, torch.ones(1, 3), 0.2, 0.28)
    # 1.5 with A>0 clipped at 1.28; 0.5 with A<0 clipped at 0.8; 1.1 with A<0 inside the range
    assert loss.tolist()[0] == pytest.approx([-1.28, 0.8, 1.1])
    assert high.tolist()[0] == [1.0, 0.0, 0.0] and low.tolist()[0] == [0.0, 1.0, 0.0]


def test_sequence_ratio_is_the_length_normalised_mean_and_reaches_every_token():
    old = torch.zeros(1, 3)
    lp = torch.tensor([[0.2, -0.1, 5.0]], requires_grad=True)  # the third token is padding
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    loss, _, _, log_ratio = G.clipped_surrogate(lp, old, torch.ones(1, 3), mask, 0.5, 0.5, level="sequence")
    assert log_ratio.tolist()[0] == pytest.approx([0.05] * 3)
    (loss * mask).sum().backward()
    # d/dlp_t of -2 exp(mean) over the two real tokens = -2 exp(0.05) / 2 for each; none for the padding
    assert lp.grad.tolist()[0] == pytest.approx([-math.exp(0.05), -math.exp(0.05), 0.0])


def test_aggregation_weights_and_units():
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    loss = torch.tensor([[1.0, 3.0, 100.0], [5.0, 100.0, 100.0], [100.0, 100.0, 100.0]])

    def aggregate(how):
        w, u = G.aggregation_weights(mask, how, max_new_tokens=3)
        return float((loss * w).sum() / u.sum())

    assert aggregate("token_mean") == pytest.approx((1 + 3 + 5) / 3)
    assert aggregate("seq_mean_token_mean") == pytest.approx((2 + 5) / 2)   # the empty row is no sequence
    assert aggregate("seq_mean_token_sum") == pytest.approx((4 + 5) / 2)
    assert aggregate("seq_mean_token_sum_norm") == pytest.approx((4 + 5) / (2 * 3))


def test_overlong_penalty_and_truncation():
    lengths = torch.tensor([5, 6, 7, 8])
    assert G.overlong_penalty(lengths, 8, 2, 1.0).tolist() == pytest.approx([0.0, 0.0, -0.5, -1.0])
    response = torch.tensor([[4, 2, 0], [4, 5, 6]])  # eos id 2: the first stopped, the second was cut
    assert G.truncated(response, eos_id=2).tolist() == [0.0, 1.0]
