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
    """Masked whitening by hand, then whitening split over two simulated ranks whose reduce really adds the
    other rank's statistics equals whitening the whole batch in one process. Planted bugs seen failing:
    whiten ignoring `reduce` (local statistics); ranks combining their means and variances instead of the
    sums (wrong with uneven masks); the variance taken over masked-out entries too."""
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    out = M.whiten(x, mask)
    # mean 2, unbiased variance 1
    assert out[0].tolist() == pytest.approx([-1.0, 0.0, 1.0, 0.0], abs=1e-6)

    gen = torch.Generator().manual_seed(0)
    whole = torch.randn(6, 5, generator=gen) * 3 + 1
    whole_mask = (torch.rand(6, 5, generator=gen) > 0.3).float()
    whole_mask[:2, :] = 1.0  # rank 0 holds many more real tokens than rank 1: uneven counts
    whole_mask[2:, 3:] = 0.0
    halves = [(whole[:2], whole_mask[:2]), (whole[2:], whole_mask[2:])]
    for shift_mean in (True, False):
        expected = M.whiten(whole, whole_mask, shift_mean=shift_mean)
        # Each rank's local statistics, as it hands them to the all-reduce ...
        local = []
        for xr, mr in halves:
            seen = []
            M.whiten(xr, mr, reduce=lambda t: seen.append(t.clone()) or t, shift_mean=shift_mean)
            assert len(seen) == 1, "whiten did not hand its statistics to reduce"
            local.append(seen[0])
        # ... and the all-reduce sum: its own statistics (the argument) plus the other rank's.
        outs = [M.whiten(xr, mr, reduce=lambda t, other=local[1 - r]: t + other, shift_mean=shift_mean)
                for r, (xr, mr) in enumerate(halves)]
        torch.testing.assert_close(torch.cat(outs), expected, rtol=1e-5, atol=1e-6)
        alone = M.whiten(*halves[1], shift_mean=shift_mean)  # the reduce matters for this data
        assert not torch.allclose(alone, expected[2:], atol=1e-3)
    assert float((expected * (1 - whole_mask)).abs().sum()) == 0.0  # masked entries stay 0


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
