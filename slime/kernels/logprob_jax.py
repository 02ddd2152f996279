"""JAX implementation of the chunked log-prob/entropy op (the kernel family of the JAX-only backend).

Same math and contract as slime/kernels/logprob.py, on jax arrays: (log_probs[N], entropy[N]) in fp32 from
logits[N, V] of any float dtype, with a hand-written VJP (jax.custom_vjp) that recomputes p chunk by chunk.
The vocabulary is walked with lax.fori_loop over dynamic slices of `chunk_size` columns, so the compiled loop
keeps one [N, chunk] fp32 block live, never an N x V log-softmax. The last slice is shifted back to stay in bounds;
its columns already counted are masked out of the forward sums (the backward simply rewrites the same values).
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

from slime.kernels.checks import KernelInputError
from slime.kernels.logprob import DEFAULT_CHUNK_SIZE, LOG_P_FLOOR

FP32_LOWEST = float(jnp.finfo(jnp.float32).min)
OP = "logprobs_and_entropy (jax)"


def logprobs_and_entropy(logits, tokens, temperature: float = 1.0, chunk_size: int = DEFAULT_CHUNK_SIZE):
    """(log_probs[N], entropy[N]) in fp32 of `tokens` under softmax(logits / temperature); differentiable in logits."""
    _check(logits, tokens, temperature, chunk_size)
    return _logprobs_and_entropy(logits, tokens, 1.0 / temperature, min(chunk_size, logits.shape[1]))


def _check(logits, tokens, temperature, chunk_size) -> None:
    if logits.ndim != 2:
        raise KernelInputError(f"{OP}: logits must be 2-D [N, V], got shape {tuple(logits.shape)}")
    if not jnp.issubdtype(logits.dtype, jnp.floating):
        raise KernelInputError(f"{OP}: logits dtype must be floating, got {logits.dtype}")
    if tokens.ndim != 1 or tokens.shape[0] != logits.shape[0]:
        raise KernelInputError(
            f"{OP}: tokens must be 1-D [N] matching logits {tuple(logits.shape)}, got tokens {tuple(tokens.shape)}"
        )
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise KernelInputError(f"{OP}: tokens dtype must be integer, got {tokens.dtype}")
    if not temperature > 0 or chunk_size < 1:
        raise KernelInputError(f"{OP}: temperature must be > 0 and chunk_size >= 1, got {temperature}, {chunk_size}")


def _chunk(logits, index, chunk):
    """Columns [start, start + chunk) with start = min(index * chunk, V - chunk), and those columns' ids."""
    start = jnp.minimum(index * chunk, logits.shape[1] - chunk)
    return lax.dynamic_slice_in_dim(logits, start, chunk, axis=1), start + jnp.arange(chunk)


def _forward(logits, tokens, inv_temp, chunk):
    rows, vocab = logits.shape

    def body(index, carry):
        m, s, w = carry
        raw, cols = _chunk(logits, index, chunk)
        fresh = cols >= index * chunk  # the shifted last slice re-reads columns already counted
        z = jnp.where(fresh, jnp.maximum(raw.astype(jnp.float32) * inv_temp, FP32_LOWEST), FP32_LOWEST)
        m_new = jnp.maximum(m, z.max(axis=1))
        rescale = jnp.exp(m - m_new)
        shift = s * (m - m_new)
        shifted = z - m_new[:, None]
        e = jnp.where(fresh, jnp.exp(shifted), 0.0)
        w = (w + shift) * rescale + (e * shifted).sum(axis=1)
        s = s * rescale + e.sum(axis=1)
        return m_new, s, w

    start = (jnp.full((rows,), FP32_LOWEST, jnp.float32), jnp.zeros(rows, jnp.float32), jnp.zeros(rows, jnp.float32))
    m, s, w = lax.fori_loop(0, math.ceil(vocab / chunk), body, start)
    token_raw = jnp.take_along_axis(logits, tokens[:, None].astype(jnp.int32), axis=1)[:, 0]
    token_z = jnp.maximum(token_raw.astype(jnp.float32) * inv_temp, FP32_LOWEST)
    log_s = jnp.log(s)
    lse = m + log_s
    entropy = log_s - w / s
    return (token_z - lse, entropy), (logits, tokens, lse, entropy)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _logprobs_and_entropy(logits, tokens, inv_temp, chunk):
    return _forward(logits, tokens, inv_temp, chunk)[0]


def _backward(inv_temp, chunk, residuals, cotangents):
    logits, tokens, lse, entropy = residuals
    grad_log_probs, grad_entropy = (c.astype(jnp.float32) for c in cotangents)
    vocab = logits.shape[1]

    def body(index, grad):
        raw, cols = _chunk(logits, index, chunk)
        log_p = jnp.maximum(raw.astype(jnp.float32) * inv_temp - lse[:, None], LOG_P_FLOOR)
        p = jnp.exp(log_p)
        d = -p * (grad_entropy[:, None] * (log_p + entropy[:, None]) + grad_log_probs[:, None])
        d = d + jnp.where(cols[None, :] == tokens[:, None], grad_log_probs[:, None], 0.0)
        start = jnp.minimum(index * chunk, vocab - chunk)
        return lax.dynamic_update_slice_in_dim(grad, (d * inv_temp).astype(grad.dtype), start, axis=1)

    grad = lax.fori_loop(0, math.ceil(vocab / chunk), body, jnp.zeros_like(logits))
    return grad, None


_logprobs_and_entropy.defvjp(
    lambda logits, tokens, inv_temp, chunk: _forward(logits, tokens, inv_temp, chunk), _backward
)
