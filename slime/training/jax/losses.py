"""The RL and SFT losses of slime.training.losses, on jax arrays: same formulas, names and arguments, so one
table of closed-form cases checks both (test/registered/training/test_losses_table.py).

Tensors are right-padded [batch, response_len] with a 0/1 mask; `denominator` replaces the local count so
micro-batches add up to the loss of the whole global batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from slime.training.losses import KL_KINDS, RATIO_TYPES, REDUCTIONS


def reduce(x, mask, mode: str = "token", denominator: float | None = None):
    mask = mask.astype(x.dtype)
    if mode == "token":
        count = jnp.maximum(mask.sum(), 1.0) if denominator is None else denominator
        return (x * mask).sum() / count
    if mode == "sample":
        per_sample = (x * mask).sum(axis=-1) / jnp.maximum(mask.sum(axis=-1), 1.0)
        count = x.shape[0] if denominator is None else denominator
        return per_sample.sum() / jnp.maximum(count, 1)  # count may be traced (a jit argument)
    raise ValueError(f"loss reduction {mode!r} is not one of {', '.join(REDUCTIONS)}")


def _sequence_log_ratio(log_ratio, mask):
    """GSPO: value = the sample's mean log-ratio, gradient = the token's own."""
    mask = mask.astype(log_ratio.dtype)
    seq = (log_ratio * mask).sum(axis=-1, keepdims=True) / jnp.maximum(mask.sum(axis=-1, keepdims=True), 1.0)
    return jax.lax.stop_gradient(seq) + log_ratio - jax.lax.stop_gradient(log_ratio)


def policy_loss(
    log_probs,
    old_log_probs,
    advantages,
    mask,
    eps_clip: float = 0.2,
    eps_clip_high: float | None = None,
    eps_clip_c: float | None = None,
    ratio_type: str = "token",
    reduction: str = "token",
    importance_weights=None,
    denominator: float | None = None,
):
    """PPO clipped surrogate with clip-higher and dual-clip; GSPO's sequence ratio; optional TIS weights."""
    if ratio_type not in RATIO_TYPES:
        raise ValueError(f"ratio_type {ratio_type!r} is not one of {', '.join(RATIO_TYPES)}")
    eps_clip_high = eps_clip if eps_clip_high is None else eps_clip_high
    log_ratio = log_probs - old_log_probs
    if ratio_type == "sequence":
        log_ratio = _sequence_log_ratio(log_ratio, mask)
    ratio = jnp.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * jnp.clip(ratio, 1.0 - eps_clip, 1.0 + eps_clip_high)
    loss = jnp.maximum(unclipped, clipped)
    clip_frac = (clipped > unclipped).astype(jnp.float32)
    if eps_clip_c is not None:
        if eps_clip_c <= 1.0:
            raise ValueError(
                f"eps_clip_c={eps_clip_c} must be > 1 (dual-clip bound on the ratio for negative advantages)"
            )
        loss = jnp.where(advantages < 0, jnp.minimum(loss, -advantages * eps_clip_c), loss)
    if importance_weights is not None:
        loss = loss * importance_weights
    metrics = {
        "pg_clip_frac": jax.lax.stop_gradient(reduce(clip_frac, mask, reduction, denominator)),
        "ppo_kl": jax.lax.stop_gradient(reduce(-log_ratio, mask, reduction, denominator)),
    }
    return reduce(loss, mask, reduction, denominator), metrics


def kl_penalty(log_probs, ref_log_probs, kind: str = "k1", clamp: float | None = None):
    """k1 = log r, k2 = (log r)^2 / 2, k3 = exp(-log r) - 1 + log r; low_var_kl = k3 clamped to +-10."""
    if kind not in KL_KINDS:
        raise ValueError(f"kl type {kind!r} is not one of {', '.join(KL_KINDS)}")
    log_ratio = log_probs.astype(jnp.float32) - ref_log_probs.astype(jnp.float32)
    if kind == "k1":
        kl = log_ratio
    elif kind == "k2":
        kl = 0.5 * log_ratio**2
    else:
        kl = jnp.exp(-log_ratio) - 1.0 + log_ratio
        if kind == "low_var_kl" and clamp is None:
            clamp = 10.0
    return kl if clamp is None else jnp.clip(kl, -clamp, clamp)


def entropy_bonus(entropy, mask, reduction: str = "token", denominator: float | None = None):
    return reduce(entropy, mask, reduction, denominator)


def truncated_importance_weights(old_log_probs, rollout_log_probs, mask, clip: float = 2.0):
    """TIS: min(pi_old / pi_rollout, clip) per token, no gradient; padding gets weight 0."""
    weights = jnp.minimum(jnp.exp(old_log_probs.astype(jnp.float32) - rollout_log_probs.astype(jnp.float32)), clip)
    return jax.lax.stop_gradient(weights * mask.astype(weights.dtype))


def sft_loss(log_probs, mask, reduction: str = "token", denominator: float | None = None):
    return -reduce(log_probs, mask, reduction, denominator)
