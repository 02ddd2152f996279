"""The JAX trainer's pure pieces: host-side padding of a micro-batch into fixed-shape arrays, response
log-probs through the chunked log-prob kernel, the RL and SFT losses, and the Megatron-equivalent LR schedule.

Shapes are rounded up (rows to a multiple of the data-parallel devices, lengths to the next of 8, 12, 16, 24, 32,
48, ...: at most a third of padding, a logarithmic number of shapes) so that a run compiles a handful of
programs, not one per batch. Padding rows and positions carry mask 0; rows are
right-padded, so causal attention alone keeps padding out of every real position.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from slime.kernels.logprob_jax import logprobs_and_entropy
from slime.models.jax_dense import DenseSpec, hidden_states, lm_logits
from slime.training.batch import TrainBatch
from slime.training.config import TrainerConfig
from slime.training.jax import losses

SMALLEST_LENGTH = 8
RESPONSE_FIELDS = ("advantages", "old_log_probs", "ref_log_probs")


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def length_bucket(length: int) -> int:
    """The smallest 2^k or 3 * 2^(k-1) (k >= 3) that holds `length`."""
    size = SMALLEST_LENGTH
    while size < length:
        size = size * 3 // 2 if size & (size - 1) == 0 else size * 4 // 3
    return size


def micro_arrays(batch: TrainBatch, indices: list[int], row_multiple: int) -> dict[str, np.ndarray]:
    """Padded numpy inputs of the samples `indices`: tokens [B, T] and response-aligned [B, L] arrays."""
    rows = _round_up(len(indices), row_multiple)
    seq = length_bucket(max(len(batch.tokens[i]) for i in indices))
    longest = length_bucket(max(batch.response_lengths[i] for i in indices))
    out = {
        "input_ids": np.full((rows, seq), batch.pad_token_id, np.int32),
        "gather": np.zeros((rows, longest), np.int32),
        "targets": np.zeros((rows, longest), np.int32),
        "mask": np.zeros((rows, longest), np.float32),
        "rollout_log_probs": np.zeros((rows, longest), np.float32),
    }
    for name in RESPONSE_FIELDS:
        out[name] = np.zeros((rows, longest), np.float32)
    for row, i in enumerate(indices):
        tokens, n = batch.tokens[i], batch.response_lengths[i]
        start = len(tokens) - n
        out["input_ids"][row, : len(tokens)] = tokens
        out["gather"][row, :n] = np.arange(start - 1, start - 1 + n)  # position t predicts token t + 1
        out["targets"][row, :n] = tokens[start:]
        out["mask"][row, :n] = batch.loss_masks[i].numpy()
        for name in RESPONSE_FIELDS:
            values = getattr(batch, name)
            if values is not None:
                out[name][row, :n] = values[i].numpy()
        if batch.rollout_log_probs[i] is not None:
            out["rollout_log_probs"][row, :n] = batch.rollout_log_probs[i].numpy()
    out["position_ids"] = np.broadcast_to(np.arange(seq, dtype=np.int32), (rows, seq)).copy()
    return out


@dataclass(frozen=True)
class LossSettings:
    """The static (compile-time) part of the loss: TrainerConfig's loss fields, and which inputs are present."""

    temperature: float
    chunk_size: int
    reduction: str
    ratio_type: str
    eps_clip: float
    eps_clip_high: float | None
    eps_clip_c: float | None
    entropy_coef: float
    use_kl_loss: bool
    kl_loss_coef: float
    kl_loss_type: str
    use_tis: bool
    tis_clip: float
    has_old_log_probs: bool

    @staticmethod
    def of(config: TrainerConfig, chunk_size: int, has_old_log_probs: bool) -> LossSettings:
        return LossSettings(
            config.rollout_temperature, chunk_size, config.loss_reduction, config.ratio_type, config.eps_clip,
            config.eps_clip_high, config.eps_clip_c, config.entropy_coef, config.use_kl_loss, config.kl_loss_coef,
            config.kl_loss_type, config.use_tis, config.tis_clip, has_old_log_probs,
        )  # fmt: skip


def response_log_probs(spec: DenseSpec, params: dict, arrays: dict, temperature: float, chunk_size: int):
    """(log-probs, entropies) [B, L] of the response tokens; the LM head runs on response positions only."""
    hidden = hidden_states(spec, params, arrays["input_ids"], arrays["position_ids"])
    picked = jnp.take_along_axis(hidden, arrays["gather"][..., None], axis=1)
    logits = lm_logits(spec, params, picked)
    rows, length, vocab = logits.shape
    log_probs, entropy = logprobs_and_entropy(
        logits.reshape(rows * length, vocab), arrays["targets"].reshape(-1), temperature, chunk_size
    )
    return log_probs.reshape(rows, length), entropy.reshape(rows, length)


def rl_loss(params, arrays, denominator, spec: DenseSpec, s: LossSettings):
    """The policy loss of slime.training.actor.PolicyTrainer.train_step for one micro-batch: (loss, metrics)."""
    log_probs, entropy = response_log_probs(spec, params, arrays, s.temperature, s.chunk_size)
    mask = arrays["mask"]
    old = arrays["old_log_probs"] if s.has_old_log_probs else jax.lax.stop_gradient(log_probs)
    weights, metrics = None, {}
    if s.use_tis:
        weights = losses.truncated_importance_weights(old, arrays["rollout_log_probs"], mask, s.tis_clip)
        metrics["tis_weight"] = losses.reduce(weights, mask, s.reduction, denominator)
    pg_loss, pg_metrics = losses.policy_loss(
        log_probs, old, arrays["advantages"], mask,
        eps_clip=s.eps_clip, eps_clip_high=s.eps_clip_high, eps_clip_c=s.eps_clip_c, ratio_type=s.ratio_type,
        reduction=s.reduction, importance_weights=weights, denominator=denominator,
    )  # fmt: skip
    entropy_mean = losses.entropy_bonus(entropy, mask, s.reduction, denominator)
    loss = pg_loss - s.entropy_coef * entropy_mean
    if s.use_kl_loss:
        kl_tokens = losses.kl_penalty(log_probs, arrays["ref_log_probs"], s.kl_loss_type)
        metrics["kl"] = losses.reduce(kl_tokens, mask, s.reduction, denominator)
        loss = loss + s.kl_loss_coef * metrics["kl"]
    metrics.update(
        loss=loss,
        pg_loss=pg_loss,
        entropy=entropy_mean,
        clip_frac=pg_metrics["pg_clip_frac"],
        ppo_kl=pg_metrics["ppo_kl"],
    )
    return loss, jax.lax.stop_gradient(metrics)


def sft_loss(params, arrays, denominator, spec: DenseSpec, s: LossSettings):
    log_probs, _ = response_log_probs(spec, params, arrays, s.temperature, s.chunk_size)
    loss = losses.sft_loss(log_probs, arrays["mask"], s.reduction, denominator)
    return loss, {"loss": jax.lax.stop_gradient(loss)}


def scheduled_lr(config: TrainerConfig, step: int) -> float:
    """Megatron's OptimizerParamScheduler.get_lr at `step` (warm-up from 0, then constant/linear/cosine/isr)."""
    max_lr, min_lr = config.lr, config.min_lr
    warmup, decay = config.lr_warmup_steps, config.lr_decay_steps
    if warmup > 0 and step <= warmup:
        return max_lr * step / warmup
    if config.lr_decay_style == "constant":
        return max_lr
    if config.lr_decay_style == "inverse-square-root":
        return max(min_lr, max_lr * math.sqrt(max(warmup, 1)) / math.sqrt(max(step, 1)))
    if step > decay:
        return min_lr
    ratio = (step - warmup) / (decay - warmup)
    coeff = 1.0 - ratio if config.lr_decay_style == "linear" else 0.5 * (math.cos(math.pi * ratio) + 1.0)
    return min_lr + coeff * (max_lr - min_lr)
