"""Advantage estimators as pure functions over tensors.

Shapes: group rewards are [num_groups, n] (n samples of one prompt per row); token-level tensors are
[batch, response_len] right-padded, with `mask` 1 on response tokens that count.
"""

from __future__ import annotations

import torch
from torch import Tensor


def grpo_advantages(rewards: Tensor, normalize_std: bool = True, eps: float = 1e-6) -> Tensor:
    """GRPO: (r - group mean) / (group std + eps); Dr.GRPO when normalize_std=False.

    std is the unbiased sample std of each group (torch.std default), as in the GRPO paper's code.
    A group of one sample has no spread: its advantage is 0.
    """
    rewards = rewards.float()
    centered = rewards - rewards.mean(dim=1, keepdim=True)
    if not normalize_std:
        return centered
    if rewards.shape[1] < 2:
        return torch.zeros_like(rewards)
    return centered / (rewards.std(dim=1, keepdim=True) + eps)


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """(x - mean) / std over the masked entries (biased variance); padding stays 0."""
    mask = mask.to(x.dtype)
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def token_rewards(final_rewards: Tensor, mask: Tensor, kl: Tensor | None = None, kl_coef: float = 0.0) -> Tensor:
    """Per-token rewards: -kl_coef * kl on every response token, plus the sample reward on its last one.

    This is KL-as-reward shaping (PPO / REINFORCE++); with kl=None it only places the final reward.
    """
    mask = mask.to(torch.float32)
    rewards = torch.zeros_like(mask)
    if kl is not None and kl_coef:
        rewards = rewards - kl_coef * kl.float() * mask
    lengths = mask.shape[1] - 1 - torch.flip(mask, dims=[1]).argmax(dim=1)  # index of the last masked token
    rows = torch.arange(mask.shape[0])
    rewards[rows, lengths] += final_rewards.float() * (mask.sum(dim=1) > 0)
    return rewards


def discounted_returns(rewards: Tensor, mask: Tensor, gamma: float) -> Tensor:
    """G_t = r_t + gamma * G_{t+1} over masked positions (padding contributes nothing)."""
    mask = mask.to(torch.float32)
    returns = torch.zeros_like(rewards, dtype=torch.float32)
    running = torch.zeros(rewards.shape[0])
    for t in reversed(range(rewards.shape[1])):
        running = rewards[:, t] * mask[:, t] + gamma * running
        returns[:, t] = running * mask[:, t]
    return returns


def reinforce_plus_plus_returns(
    final_rewards: Tensor, mask: Tensor, kl: Tensor | None = None, kl_coef: float = 0.0, gamma: float = 1.0
) -> Tensor:
    """REINFORCE++: discounted returns of KL-shaped token rewards, then whitened over the whole batch.

    Returns the advantages (whitened returns) as [batch, response_len].
    """
    returns = discounted_returns(token_rewards(final_rewards, mask, kl, kl_coef), mask, gamma)
    return masked_whiten(returns, mask)


def reinforce_plus_plus_baseline_advantages(rewards: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """REINFORCE++-baseline: subtract the group mean reward, broadcast to tokens, whiten over the batch.

    `rewards` is [num_groups, n]; `mask` is [num_groups * n, response_len] in the same (row-major) order.
    """
    centered = (rewards.float() - rewards.float().mean(dim=1, keepdim=True)).reshape(-1, 1)
    return masked_whiten(centered * mask.float(), mask, eps=eps)


def gae(rewards: Tensor, values: Tensor, gamma: float, lam: float, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over right-padded response tokens.

    delta_t = r_t + gamma * V_{t+1} - V_t (V beyond the last valid token = 0);
    A_t = delta_t + gamma * lam * A_{t+1}; returns = A + V. Padding positions are 0 in both outputs.
    """
    mask = mask.to(torch.float32)
    rewards, values = rewards.float() * mask, values.float() * mask
    advantages = torch.zeros_like(rewards)
    last = torch.zeros(rewards.shape[0])
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros(rewards.shape[0])
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = (delta + gamma * lam * last) * mask[:, t]
        advantages[:, t] = last
    return advantages, (advantages + values) * mask
