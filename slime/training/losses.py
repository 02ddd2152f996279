"""RL and SFT losses as pure functions over right-padded [batch, response_len] tensors plus a mask.

Every loss is reduced by `reduce`: "token" = mean over all masked tokens, "sample" = mean over samples of
each sample's token mean. A `denominator` replaces the local count, so that micro-batches on several
data-parallel ranks add up to the loss of the whole global batch (the trainer passes the global count).
"""

from __future__ import annotations

import torch
from torch import Tensor

REDUCTIONS = ("token", "sample")
KL_KINDS = ("k1", "k2", "k3", "low_var_kl")
RATIO_TYPES = ("token", "sequence")


def reduce(x: Tensor, mask: Tensor, mode: str = "token", denominator: float | None = None) -> Tensor:
    mask = mask.to(x.dtype)
    if mode == "token":
        total = (x * mask).sum()
        count = mask.sum().clamp(min=1.0) if denominator is None else denominator
        return total / count
    if mode == "sample":
        per_sample = (x * mask).sum(dim=-1) / mask.sum(dim=-1).clamp(min=1.0)
        count = x.shape[0] if denominator is None else denominator
        return per_sample.sum() / max(count, 1)
    raise ValueError(f"loss reduction {mode!r} is not one of {', '.join(REDUCTIONS)}")


def _sequence_log_ratio(log_ratio: Tensor, mask: Tensor) -> Tensor:
    """GSPO: per-token log-ratio whose value is the sample's mean log-ratio and whose gradient is the token's."""
    mask = mask.to(log_ratio.dtype)
    seq = (log_ratio * mask).sum(dim=-1, keepdim=True) / mask.sum(dim=-1, keepdim=True).clamp(min=1.0)
    return seq.detach() + log_ratio - log_ratio.detach()


def policy_loss(
    log_probs: Tensor,
    old_log_probs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    eps_clip: float = 0.2,
    eps_clip_high: float | None = None,
    eps_clip_c: float | None = None,
    ratio_type: str = "token",
    reduction: str = "token",
    importance_weights: Tensor | None = None,
    denominator: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate with clip-higher (eps_clip_high) and dual-clip (eps_clip_c > 1).

    ratio_type="sequence" is GSPO's sequence-level ratio. `importance_weights` (e.g. truncated IS weights
    against the rollout engine's log-probs) multiply the per-token loss.
    """
    if ratio_type not in RATIO_TYPES:
        raise ValueError(f"ratio_type {ratio_type!r} is not one of {', '.join(RATIO_TYPES)}")
    eps_clip_high = eps_clip if eps_clip_high is None else eps_clip_high
    log_ratio = log_probs - old_log_probs
    if ratio_type == "sequence":
        log_ratio = _sequence_log_ratio(log_ratio, mask)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - eps_clip, 1.0 + eps_clip_high)
    loss = torch.maximum(unclipped, clipped)
    clip_frac = (clipped > unclipped).float()
    if eps_clip_c is not None:
        if eps_clip_c <= 1.0:
            raise ValueError(
                f"eps_clip_c={eps_clip_c} must be > 1 (dual-clip bound on the ratio for negative advantages)"
            )
        dual = torch.minimum(loss, -advantages * eps_clip_c)
        loss = torch.where(advantages < 0, dual, loss)
    if importance_weights is not None:
        loss = loss * importance_weights
    metrics = {
        "pg_clip_frac": reduce(clip_frac, mask, reduction, denominator).detach(),
        "ppo_kl": reduce(-log_ratio, mask, reduction, denominator).detach(),
    }
    return reduce(loss, mask, reduction, denominator), metrics


def kl_penalty(log_probs: Tensor, ref_log_probs: Tensor, kind: str = "k1", clamp: float | None = None) -> Tensor:
    """Per-token estimators of KL(pi || ref) from samples of pi.

    k1 = log r, k2 = (log r)^2 / 2, k3 = exp(-log r) - 1 + log r  (r = pi / ref, always >= 0).
    low_var_kl is k3 clamped to [-10, 10] (unless `clamp` says otherwise); `clamp` bounds any kind.
    """
    if kind not in KL_KINDS:
        raise ValueError(f"kl type {kind!r} is not one of {', '.join(KL_KINDS)}")
    log_ratio = log_probs.float() - ref_log_probs.float()
    if kind == "k1":
        kl = log_ratio
    elif kind == "k2":
        kl = 0.5 * log_ratio**2
    else:
        kl = torch.exp(-log_ratio) - 1.0 + log_ratio
        if kind == "low_var_kl" and clamp is None:
            clamp = 10.0
    if clamp is not None:
        kl = kl.clamp(-clamp, clamp)
    return kl


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    clip: float | None = 0.2,
    reduction: str = "token",
    denominator: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO value loss: 0.5 * max((V - R)^2, (V_clipped - R)^2), V_clipped = old + clamp(V - old, +-clip)."""
    unclipped = (values - returns) ** 2
    if clip is None:
        loss, clip_frac = unclipped, torch.zeros_like(values)
    else:
        clipped_values = old_values + (values - old_values).clamp(-clip, clip)
        clipped = (clipped_values - returns) ** 2
        loss = torch.maximum(unclipped, clipped)
        clip_frac = (clipped > unclipped).float()
    return 0.5 * reduce(loss, mask, reduction, denominator), {
        "vf_clip_frac": reduce(clip_frac, mask, reduction, denominator).detach()
    }


def entropy_bonus(entropy: Tensor, mask: Tensor, reduction: str = "token", denominator: float | None = None) -> Tensor:
    """Mean entropy; the trainer subtracts entropy_coef times this from the loss."""
    return reduce(entropy, mask, reduction, denominator)


def truncated_importance_weights(
    old_log_probs: Tensor, rollout_log_probs: Tensor, mask: Tensor, clip: float = 2.0
) -> Tensor:
    """TIS: min(pi_old / pi_rollout, clip) per token, no gradient; padding gets weight 0."""
    weights = torch.exp(old_log_probs.float() - rollout_log_probs.float()).clamp(max=clip)
    return (weights * mask.to(weights.dtype)).detach()


def sft_loss(log_probs: Tensor, mask: Tensor, reduction: str = "token", denominator: float | None = None) -> Tensor:
    """Negative log-likelihood of the masked (response) tokens."""
    return -reduce(log_probs, mask, reduction, denominator)
