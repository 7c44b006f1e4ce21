"""PPO arithmetic against values worked out by hand."""
from __future__ import annotations

import pytest
import torch

from distributed_ft.rl import math as M


def test_gae_short_trajectory_by_hand():
    # One sequence of 3 real tokens then padding; gamma 0.9, lambda 0.5.
    rewards = torch.tensor([[0.0, 0.0, 1.0, 5.0]])
    values = torch.tensor([[0.5, 0.4, 0.3, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    adv, ret = M.gae(rewards, values, mask, gamma=0.9, lam=0.5)
    d2 = 1.0 - 0.3                      # last real token: next value is 0
    d1 = 0.0 + 0.9 * 0.3 - 0.4
    d0 = 0.0 + 0.9 * 0.4 - 0.5
    a2 = d2
    a1 = d1 + 0.45 * a2
    a0 = d0 + 0.45 * a1
    assert adv[0].tolist() == pytest.approx([a0, a1, a2, 0.0])
    assert ret[0].tolist() == pytest.approx([a0 + 0.5, a1 + 0.4, a2 + 0.3, 0.0])


def test_gae_gamma_lambda_one_gives_reward_to_go_minus_value():
    rewards = torch.tensor([[1.0, 2.0, 3.0]])
    values = torch.tensor([[0.5, 0.25, 1.0]])
    adv, ret = M.gae(rewards, values, torch.ones(1, 3), gamma=1.0, lam=1.0)
    assert ret[0].tolist() == pytest.approx([6.0, 5.0, 3.0])
    assert adv[0].tolist() == pytest.approx([5.5, 4.75, 2.0])


def test_whiten_masked_and_through_a_reduce():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    out = M.whiten(x, mask)
    # mean 2, unbiased variance 1
    assert out[0].tolist() == pytest.approx([-1.0, 0.0, 1.0, 0.0], abs=1e-6)
    # Two "ranks" holding halves of [1, 2, 3, 4] whiten like one rank holding all of it.
    a, b = torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, 4.0]])
    ones = torch.ones(1, 2)
    pa = torch.stack([(a * ones).sum(), (a * a).sum(), ones.sum()]).double()
    pb = torch.stack([(b * ones).sum(), (b * b).sum(), ones.sum()]).double()
    both = pa + pb
    calls = iter([both])
    out_a = M.whiten(a, ones, reduce=lambda t: next(calls))
    full = M.whiten(torch.tensor([[1.0, 2.0, 3.0, 4.0]]), torch.ones(1, 4))
    assert out_a[0].tolist() == pytest.approx(full[0, :2].tolist(), abs=1e-6)


def test_masked_mean():
    x = torch.tensor([[2.0, 4.0], [6.0, 8.0]])
    assert float(M.masked_mean(x, torch.tensor([[1.0, 0.0], [1.0, 1.0]]))) == pytest.approx(16.0 / 3)


def test_clipped_surrogate_values_and_zero_gradient_beyond_clip():
    old = torch.zeros(4)
    new = torch.log(torch.tensor([1.1, 1.5, 0.5, 1.5])).requires_grad_(True)
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0])
    loss, clipped, _ = M.policy_loss(new, old, adv, clip_range=0.2)
    # ratio 1.1 inside: -1.1; ratio 1.5 with A>0 clipped to 1.2: -1.2; ratio 0.5 with A<0 clipped to 0.8: 0.8;
    # ratio 1.5 with A<0: the unclipped term 1.5 is larger (pessimistic), so no clipping.
    assert loss.tolist() == pytest.approx([-1.1, -1.2, 0.8, 1.5])
    assert clipped.tolist() == [0.0, 1.0, 1.0, 0.0]
    loss.sum().backward()
    grad = new.grad.tolist()
    assert grad[1] == 0.0 and grad[2] == 0.0            # beyond the clip range: no gradient
    assert grad[0] == pytest.approx(-1.1) and grad[3] == pytest.approx(1.5)  # d(-A r)/dlogp = -A r


def test_value_loss_clipping():
    old = torch.tensor([0.0, 0.0])
    new = torch.tensor([1.0, 0.1], requires_grad=True)
    returns = torch.tensor([0.0, 1.0])
    loss, clipped = M.value_loss(new, old, returns, clip_range=0.2)
    # first: plain (1-0)^2 = 1, clipped (0.2-0)^2 = 0.04 -> max 1 (unclipped kept); second: plain 0.81,
    # clipped: v stays 0.1 (inside range) -> 0.81.
    assert loss.tolist() == pytest.approx([0.5, 0.405])
    # value moved past the range towards the return: the clipped term wins and the gradient is zero
    new2 = torch.tensor([0.5], requires_grad=True)
    loss2, clipped2 = M.value_loss(new2, torch.tensor([0.0]), torch.tensor([-1.0]), clip_range=0.2)
    assert float(loss2.detach()) == pytest.approx(0.5 * 1.5 ** 2) and clipped2.tolist() == [0.0]
    new3 = torch.tensor([-0.5], requires_grad=True)
    loss3, clipped3 = M.value_loss(new3, torch.tensor([0.0]), torch.tensor([1.0]), clip_range=0.2)
    assert float(loss3.detach()) == pytest.approx(0.5 * 1.5 ** 2)  # (-0.2 - 1)^2 = 1.44 < 2.25: plain wins
    new4 = torch.tensor([0.5], requires_grad=True)
    loss4, clipped4 = M.value_loss(new4, torch.tensor([0.0]), torch.tensor([0.45]), clip_range=0.2)
    assert float(loss4.detach()) == pytest.approx(0.5 * 0.25 ** 2) and clipped4.tolist() == [1.0]
    loss4.sum().backward()
    assert new4.grad.tolist() == [0.0]


def test_token_rewards_kl_and_score_on_last_token():
    lp = torch.tensor([[-1.0, -2.0, -3.0]])
    ref = torch.tensor([[-1.5, -2.0, -2.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    rewards, kl = M.token_rewards(torch.tensor([2.0]), lp, ref, mask, kl_coef=0.1)
    assert kl.tolist() == [[0.5, 0.0, 0.0]]
    assert rewards[0].tolist() == pytest.approx([-0.05, 2.0, 0.0])


def test_adaptive_kl_controller():
    ctl = M.AdaptiveKLController(0.2, target=6.0, horizon=10000)
    ctl.update(9.0, 1000)          # error 0.5 clipped to 0.2 -> x (1 + 0.2 * 0.1)
    assert ctl.value == pytest.approx(0.2 * 1.02)
    ctl.update(5.4, 1000)          # error -0.1 -> x (1 - 0.01)
    assert ctl.value == pytest.approx(0.2 * 1.02 * 0.99)
    restored = M.AdaptiveKLController(1.0, 6.0, 10000)
    restored.load_state_dict(ctl.state_dict())
    assert restored.value == ctl.value
    fixed = M.FixedKLController(0.3)
    fixed.update(100.0, 1000)
    assert fixed.value == 0.3


def test_entropy_and_logprobs():
    logits = torch.zeros(1, 1, 4)
    assert float(M.entropy_from_logits(logits)) == pytest.approx(torch.log(torch.tensor(4.0)).item())
    log4 = torch.log(torch.tensor(4.0)).item()
    assert float(M.logprobs_from_logits(logits, torch.tensor([[2]]))) == pytest.approx(-log4)
