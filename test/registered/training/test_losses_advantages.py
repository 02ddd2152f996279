"""Losses and advantage estimators against values computed by hand."""

import math

import pytest
import torch

from slime.testing.ci_register import register_cpu_ci
from slime.training import advantages as adv
from slime.training import losses

register_cpu_ci(est_time=8, suite="base-a-test-cpu")


def t(*rows):
    return torch.tensor(rows, dtype=torch.float32)


def test_grpo_and_dr_grpo():
    rewards = t([1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0])
    out = adv.grpo_advantages(rewards, eps=0.0 + 1e-12)
    std = math.sqrt(1.0 / 3.0)  # unbiased std of [1,0,0,1]
    assert torch.allclose(out[0], torch.tensor([0.5, -0.5, -0.5, 0.5]) / std, atol=1e-6)
    assert torch.equal(out[1], torch.zeros(4))  # no spread -> no signal
    assert torch.equal(
        adv.grpo_advantages(rewards, normalize_std=False), t([0.5, -0.5, -0.5, 0.5], [0.0, 0.0, 0.0, 0.0])
    )


def test_gae_closed_form():
    # one sample, 3 tokens, reward only at the end
    rewards, values, mask = t([0.0, 0.0, 1.0]), t([0.5, 0.4, 0.3]), t([1.0, 1.0, 1.0])
    gamma, lam = 0.9, 0.8
    d2 = 1.0 - 0.3
    d1 = 0.0 + gamma * 0.3 - 0.4
    d0 = 0.0 + gamma * 0.4 - 0.5
    a2 = d2
    a1 = d1 + gamma * lam * a2
    a0 = d0 + gamma * lam * a1
    advantages, returns = adv.gae(rewards, values, gamma, lam, mask)
    assert torch.allclose(advantages, t([a0, a1, a2]), atol=1e-6)
    assert torch.allclose(returns, t([a0 + 0.5, a1 + 0.4, a2 + 0.3]), atol=1e-6)


def test_gae_ignores_padding():
    advantages, returns = adv.gae(t([0.0, 1.0, 9.0]), t([0.2, 0.1, 5.0]), 1.0, 1.0, t([1.0, 1.0, 0.0]))
    assert torch.allclose(advantages, t([1.0 - 0.2, 1.0 - 0.1, 0.0]), atol=1e-6)
    assert returns[0, 2] == 0.0


def test_reinforce_plus_plus_returns_with_kl_shaping():
    mask = t([1.0, 1.0, 0.0], [1.0, 1.0, 1.0])
    kl = t([0.1, 0.2, 7.0], [0.0, 0.0, 0.0])
    rewards = adv.token_rewards(torch.tensor([1.0, 0.0]), mask, kl, kl_coef=0.5)
    assert torch.allclose(rewards, t([-0.05, -0.1 + 1.0, 0.0], [0.0, 0.0, 0.0]))
    returns = adv.discounted_returns(rewards, mask, gamma=1.0)
    assert torch.allclose(returns, t([0.85, 0.9, 0.0], [0.0, 0.0, 0.0]))
    whitened = adv.reinforce_plus_plus_returns(torch.tensor([1.0, 0.0]), mask, kl, kl_coef=0.5)
    values = torch.tensor([0.85, 0.9, 0.0, 0.0, 0.0])
    expected = (values - values.mean()) / values.std(unbiased=False)
    assert torch.allclose(whitened[mask.bool()], expected, atol=1e-5)
    assert whitened[0, 2] == 0.0


def test_reinforce_plus_plus_baseline():
    rewards = t([1.0, 0.0])  # one group of two
    mask = t([1.0, 1.0], [1.0, 0.0])
    out = adv.reinforce_plus_plus_baseline_advantages(rewards, mask)
    values = torch.tensor([0.5, 0.5, -0.5])
    expected = (values - values.mean()) / values.std(unbiased=False)
    assert torch.allclose(out[mask.bool()], expected, atol=1e-5)


def test_reduce_token_vs_sample():
    x, mask = t([1.0, 3.0, 100.0], [5.0, 0.0, 0.0]), t([1.0, 1.0, 0.0], [1.0, 0.0, 0.0])
    assert losses.reduce(x, mask, "token").item() == pytest.approx(3.0)  # (1+3+5)/3
    assert losses.reduce(x, mask, "sample").item() == pytest.approx(3.5)  # (2 + 5)/2
    assert losses.reduce(x, mask, "token", denominator=9.0).item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="not one of token, sample"):
        losses.reduce(x, mask, "seq")


def test_policy_loss_clip_clip_higher_and_dual_clip():
    mask = torch.ones(1, 4)
    ratio = t([1.5, 0.5, 1.1, 3.0])
    old = torch.zeros(1, 4)
    lp = ratio.log()
    a = t([1.0, -1.0, 1.0, -1.0])
    loss, m = losses.policy_loss(lp, old, a, mask, eps_clip=0.2)
    per_token = [-1.2, 0.8, -1.1, 3.0]  # max(-A r, -A clip(r))
    assert loss.item() == pytest.approx(sum(per_token) / 4, abs=1e-6)
    assert m["pg_clip_frac"].item() == pytest.approx(0.5)
    loss_high, _ = losses.policy_loss(lp, old, a, mask, eps_clip=0.2, eps_clip_high=0.28)
    assert loss_high.item() == pytest.approx((-1.28 + 0.8 - 1.1 + 3.0) / 4, abs=1e-6)
    loss_dual, _ = losses.policy_loss(lp, old, a, mask, eps_clip=0.2, eps_clip_c=2.0)
    assert loss_dual.item() == pytest.approx((-1.2 + 0.8 - 1.1 + 2.0) / 4, abs=1e-6)  # A<0 capped at c*|A|


def test_policy_loss_gradient_is_minus_advantage_on_policy():
    lp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    a = t([2.0, -1.0])
    loss, _ = losses.policy_loss(lp, lp.detach(), a, torch.ones(1, 2))
    loss.backward()
    assert torch.allclose(lp.grad, -a / 2)


def test_gspo_sequence_ratio_value_and_gradient():
    lp = torch.tensor([[-1.0, -2.0, -3.0]], requires_grad=True)
    old = t([-1.1, -2.1, -2.9])
    mask = torch.ones(1, 3)
    a = t([1.0, 1.0, 1.0])
    loss, _ = losses.policy_loss(lp, old, a, mask, eps_clip=10.0, ratio_type="sequence")
    seq_ratio = math.exp((0.1 + 0.1 - 0.1) / 3)
    assert loss.item() == pytest.approx(-seq_ratio, abs=1e-6)
    loss.backward()
    assert torch.allclose(lp.grad, torch.full((1, 3), -seq_ratio / 3), atol=1e-6)


def test_kl_estimators():
    lp, ref = t([-1.0, -2.0]), t([-1.5, -1.0])
    lr = torch.tensor([0.5, -1.0])
    assert torch.allclose(losses.kl_penalty(lp, ref, "k1"), lr.unsqueeze(0))
    assert torch.allclose(losses.kl_penalty(lp, ref, "k2"), (0.5 * lr**2).unsqueeze(0))
    k3 = torch.exp(-lr) - 1 + lr
    assert torch.allclose(losses.kl_penalty(lp, ref, "k3"), k3.unsqueeze(0))
    assert torch.allclose(losses.kl_penalty(t([0.0]), t([-20.0]), "low_var_kl"), t([10.0]))
    assert torch.allclose(losses.kl_penalty(lp, ref, "k1", clamp=0.7), t([0.5, -0.7]))
    with pytest.raises(ValueError, match="k1, k2, k3, low_var_kl"):
        losses.kl_penalty(lp, ref, "k4")


def test_value_loss_clipped():
    values, old, returns = t([1.0, 0.0]), t([0.5, 0.5]), t([2.0, 0.0])
    loss, m = losses.value_loss(values, old, returns, torch.ones(1, 2), clip=0.2)
    # token0: unclipped (1-2)^2=1, clipped v=0.7 -> 1.69 ; token1: unclipped 0, clipped v=0.3 -> 0.09
    assert loss.item() == pytest.approx(0.5 * (1.69 + 0.09) / 2, abs=1e-6)
    assert m["vf_clip_frac"].item() == pytest.approx(1.0)


def test_tis_entropy_sft():
    w = losses.truncated_importance_weights(
        t([0.0, 0.0, 0.0]), t([0.0, math.log(4.0), -math.log(4.0)]), t([1.0, 1.0, 0.0]), clip=2.0
    )
    assert torch.allclose(w, t([1.0, 0.25, 0.0]))
    assert losses.entropy_bonus(t([1.0, 3.0]), t([1.0, 1.0])).item() == pytest.approx(2.0)
    assert losses.sft_loss(t([-1.0, -3.0, -7.0]), t([1.0, 1.0, 0.0])).item() == pytest.approx(2.0)
