"""GRPO advantages and loss against hand-computed values."""

import math

import pytest
import torch

from rlvrx.train.grpo import aggregate, group_advantages, policy_loss, zero_std_fraction


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    adv = group_advantages(rewards, num_generations=4, scale_rewards="group", eps=0.0)
    # group 1: mean 0.5, unbiased std sqrt(1/3) -> +-0.5 / 0.57735 = +-0.866025
    s = math.sqrt(1 / 3)
    assert adv[:4].tolist() == pytest.approx([0.5 / s, -0.5 / s, -0.5 / s, 0.5 / s], abs=1e-6)
    # group 2: all equal -> zero advantage (0 / (0 + eps)); with eps=0 that is 0/0 -> nan, so use default eps
    adv = group_advantages(rewards, num_generations=4)
    assert adv[4:].tolist() == [0.0, 0.0, 0.0, 0.0]
    assert adv[0].item() == pytest.approx(0.5 / (s + 1e-4), abs=1e-6)


def test_scale_rewards_batch_and_none():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0])
    none = group_advantages(rewards, 3, "none")
    assert none.tolist() == pytest.approx([2 / 3, -1 / 3, -1 / 3, -2 / 3, 1 / 3, 1 / 3], abs=1e-6)
    batch = group_advantages(rewards, 3, "batch", eps=0.0)
    std = torch.tensor([1.0, 0, 0, 0, 1, 1]).std().item()  # 0.5477
    assert batch.tolist() == pytest.approx([v / std for v in none.tolist()], abs=1e-6)
    with pytest.raises(ValueError):
        group_advantages(torch.ones(5), 2)


def test_zero_std_fraction():
    assert zero_std_fraction(torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0]), 2) == pytest.approx(2 / 3)


def test_aggregation_modes():
    values = torch.tensor([[1.0, 2.0, 3.0], [10.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    assert aggregate(values, mask, "token-mean").item() == pytest.approx((1 + 2 + 3 + 10) / 4)
    assert aggregate(values, mask, "seq-mean-token-mean").item() == pytest.approx((2 + 10) / 2)


def test_clipped_loss_by_hand():
    # Two sequences, two tokens each; ratios e^0.5 (above 1+eps_high) and e^-0.5 (below 1-eps).
    old = torch.zeros(2, 2)
    new = torch.tensor([[0.5, 0.0], [-0.5, 0.1]], requires_grad=True)
    adv = torch.tensor([1.0, -2.0])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    loss, stats = policy_loss(new, old, adv, mask, epsilon=0.2, epsilon_high=0.28, loss_agg="token-mean")
    r = [math.exp(0.5), 1.0, math.exp(-0.5)]
    # seq 1, A=+1: min(r*A, clip(r)*A) -> token 1 clipped to 1.28, token 2 ratio 1 -> 1
    # seq 2, A=-2: min(r*-2, clip(r,0.8,1.28)*-2) = min(-1.2131, -1.6) = -1.6 (clipped branch)
    expected = -(1.28 + 1.0 + (-1.6)) / 3
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert stats.clip_fraction == pytest.approx(2 / 3)
    loss.backward()
    # clipped tokens get no gradient; the unclipped token (ratio 1, A=+1) gets -A * r / N
    assert new.grad[0, 0].item() == 0.0 and new.grad[1, 0].item() == 0.0
    assert new.grad[0, 1].item() == pytest.approx(-1.0 / 3, abs=1e-6)
    assert new.grad[1, 1].item() == 0.0  # masked
    assert r  # keep the hand values above visible


def test_kl_term_low_variance_estimator():
    logp = torch.tensor([[-1.0, -2.0]])
    ref = torch.tensor([[-1.5, -1.0]])
    mask = torch.ones(1, 2)
    adv = torch.zeros(1)
    loss, stats = policy_loss(logp, logp.clone(), adv, mask, beta=0.1, ref_logprobs=ref)
    k3 = [math.exp(d) - d - 1 for d in (-0.5, 1.0)]
    assert stats.kl == pytest.approx(sum(k3) / 2, abs=1e-6)
    assert loss.item() == pytest.approx(0.1 * sum(k3) / 2, abs=1e-6)
