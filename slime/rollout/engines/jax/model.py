"""Jitted prefill and decode of the JAX dense models (slime.models.jax_dense) over a static KV cache, with the
next-token sampler fused into each step.

Shapes are bucketed so a run compiles a handful of programs and then reuses them: a prefill is compiled per
(batch bucket, prompt-length bucket), a decode step per (rows bucket, attended-length bucket), each times
`filtered` (whether some row truncates with top-k / top-p / min-p). Buckets are powers of two, so the number
of programs grows with log(max_batch) * log(max_seq_len), not with the traffic. `traces` counts how often a
step function was traced (each trace is one compilation), which the tests use to bound recompilation.

The cache is [layers, max_batch + 1, max_seq_len, kv_heads, head_dim] for K and for V; row max_batch is a
scratch row that the padding rows of a prefill batch write into. Cache buffers are donated to each step, so
the compiler updates them in place instead of copying the whole cache per token.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from slime.models import jax_dense
from slime.models.jax_dense import EMBED, DenseSpec

# The per-layer pieces are shared with the trainer's forward, so rollout and training compute the same function.
from slime.models.jax_dense import _linear as linear
from slime.models.jax_dense import _mlp as mlp
from slime.models.jax_dense import _rms_norm as rms_norm
from slime.models.jax_dense import _rotate as rotate

MIN_BUCKET = 8


def bucket(n: int, cap: int) -> int:
    """The smallest power of two >= n (at least MIN_BUCKET), capped at `cap`."""
    size = MIN_BUCKET
    while size < n:
        size *= 2
    return min(size, cap)


@dataclass(frozen=True)
class RowSampling:
    """Per-row sampling inputs [rows] (numpy, moved to the device by the step call)."""

    temperature: np.ndarray  # float32, 0 = greedy
    top_k: np.ndarray  # int32, <= 0 = off
    top_p: np.ndarray  # float32
    min_p: np.ndarray  # float32
    seed: np.ndarray  # uint32: the request's sampling seed
    counter: np.ndarray  # int32: index of the token being drawn within its request (0 = first new token)


def sample(logits, s: RowSampling, filtered: bool):
    """(tokens [R], log-probs [R]) from fp32 logits [R, V]. Log-probs are log_softmax(logits / T) over the full
    vocabulary (T = 1 for greedy rows), before truncation. Each row draws one uniform from a key made of its own
    seed and counter, so its token does not depend on the other rows."""
    temperature = jnp.where(s.temperature > 0, s.temperature, 1.0)
    log_probs = jax.nn.log_softmax(logits / temperature[:, None], axis=-1)
    candidates = _truncate(log_probs, s) if filtered else log_probs
    keys = jax.vmap(lambda seed, counter: jax.random.fold_in(jax.random.PRNGKey(seed), counter))(s.seed, s.counter)
    uniform = jax.vmap(lambda key: jax.random.uniform(key, dtype=jnp.float32))(keys)
    cdf = jnp.cumsum(jnp.exp(candidates), axis=-1)
    target = jnp.minimum(uniform, 1.0 - 1e-7) * cdf[:, -1]
    drawn = jnp.minimum(jnp.sum(cdf <= target[:, None], axis=-1), logits.shape[-1] - 1)  # first cdf > target
    tokens = jnp.where(s.temperature > 0, drawn, jnp.argmax(logits, axis=-1)).astype(jnp.int32)
    return tokens, jnp.take_along_axis(log_probs, tokens[:, None], axis=-1)[:, 0]


def _truncate(log_probs, s: RowSampling):
    """-inf outside top-k, top-p (on the untruncated mass) and min-p; the most likely token always stays."""
    vocab = log_probs.shape[-1]
    order = jnp.argsort(-log_probs, axis=-1)
    sorted_lp = jnp.take_along_axis(log_probs, order, axis=-1)
    sorted_p = jnp.exp(sorted_lp)
    rank = jnp.arange(vocab)[None, :]
    k = jnp.where(s.top_k > 0, s.top_k, vocab)[:, None]
    drop = (rank >= k) | ((jnp.cumsum(sorted_p, axis=-1) - sorted_p) > s.top_p[:, None])
    drop |= sorted_p < sorted_p[:, :1] * s.min_p[:, None]
    drop = drop.at[:, 0].set(False)
    kept = jnp.where(drop, -jnp.inf, sorted_lp)
    rows = jnp.arange(log_probs.shape[0])[:, None]
    return jnp.full_like(log_probs, -jnp.inf).at[rows, order].set(kept)


def _rope(spec: DenseSpec, positions, dtype):
    freqs = positions[..., None].astype(jnp.float32) * jnp.asarray(spec.inv_freq, jnp.float32)
    angles = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def _qkv(spec: DenseSpec, params: dict, prefix: str, h, cos, sin):
    b, t, _ = h.shape
    d = spec.head_dim
    q = linear(h, params, prefix + "q_proj", spec.qkv_bias).reshape(b, t, spec.num_heads, d)
    k = linear(h, params, prefix + "k_proj", spec.qkv_bias).reshape(b, t, spec.num_kv_heads, d)
    v = linear(h, params, prefix + "v_proj", spec.qkv_bias).reshape(b, t, spec.num_kv_heads, d)
    if spec.qk_norm:
        q = rms_norm(q, params[prefix + "q_norm.weight"], spec.rms_eps)
        k = rms_norm(k, params[prefix + "k_norm.weight"], spec.rms_eps)
    return rotate(q, cos, sin), rotate(k, cos, sin), v


def _attend(spec: DenseSpec, params: dict, prefix: str, q, k, v, mask):
    """q [B, Tq, heads, D] against k, v [B, Tk, kv, D]; mask broadcasts to [B, kv, group, Tq, Tk]."""
    b, t = q.shape[:2]
    kv, d = spec.num_kv_heads, spec.head_dim
    q = q.reshape(b, t, kv, spec.num_heads // kv, d)
    scores = jnp.einsum("bqgrd,bkgd->bgrqk", q, k).astype(jnp.float32) * (d**-0.5)
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bgrqk,bkgd->bqgrd", probs, v).reshape(b, t, spec.num_heads * d)
    return linear(out, params, prefix + "o_proj")


def _logits(spec: DenseSpec, params: dict, hidden):
    hidden = rms_norm(hidden, params["model.norm.weight"], spec.rms_eps)
    return jax_dense.lm_logits(spec, params, hidden)[..., : spec.vocab_size].astype(jnp.float32)


class StepFunctions:
    """The jitted steps of one model spec, with a count of traces (= compilations) per step kind."""

    def __init__(self, spec: DenseSpec):
        self.spec = spec
        self.traces = {"prefill": 0, "decode": 0}
        self.prefill = jax.jit(self._prefill, static_argnames=("filtered",), donate_argnums=(1, 2))
        self.decode = jax.jit(self._decode, static_argnames=("attend", "filtered"), donate_argnums=(1, 2))

    def _prefill(self, params, k_cache, v_cache, tokens, lengths, slots, sampling: RowSampling, filtered: bool):
        """tokens [b, T] right-padded, lengths [b], slots [b] (the scratch row for padding rows)."""
        self.traces["prefill"] += 1
        spec = self.spec
        b, t = tokens.shape
        x = params[EMBED][tokens]
        cos, sin = _rope(spec, jnp.broadcast_to(jnp.arange(t), (b, t)), x.dtype)
        mask = jnp.tril(jnp.ones((t, t), bool))[None, None, None]
        rows, cols = slots[:, None], jnp.arange(t)[None, :]
        for i in range(spec.num_layers):
            p = f"model.layers.{i}."
            h = rms_norm(x, params[p + "input_layernorm.weight"], spec.rms_eps)
            q, k, v = _qkv(spec, params, p + "self_attn.", h, cos, sin)
            k_cache = k_cache.at[i, rows, cols].set(k.astype(k_cache.dtype))
            v_cache = v_cache.at[i, rows, cols].set(v.astype(v_cache.dtype))
            x = x + _attend(spec, params, p + "self_attn.", q, k, v, mask)
            h = rms_norm(x, params[p + "post_attention_layernorm.weight"], spec.rms_eps)
            x = x + mlp(params, p + "mlp.", h)
        last = jnp.take_along_axis(x, (lengths - 1)[:, None, None], axis=1)[:, 0]
        tokens, log_probs = sample(_logits(spec, params, last), sampling, filtered)
        return k_cache, v_cache, tokens, log_probs

    def _decode(self, params, k_cache, v_cache, tokens, positions, sampling: RowSampling, attend: int, filtered: bool):
        """One new token for cache rows [0, R): tokens [R] sit at positions [R]; keys [0, attend) are read."""
        self.traces["decode"] += 1
        spec = self.spec
        r = tokens.shape[0]
        x = params[EMBED][tokens][:, None, :]
        cos, sin = _rope(spec, positions[:, None], x.dtype)
        rows = jnp.arange(r)
        mask = (jnp.arange(attend)[None, :] <= positions[:, None])[:, None, None, None, :]
        for i in range(spec.num_layers):
            p = f"model.layers.{i}."
            h = rms_norm(x, params[p + "input_layernorm.weight"], spec.rms_eps)
            q, k, v = _qkv(spec, params, p + "self_attn.", h, cos, sin)
            k_cache = k_cache.at[i, rows, positions].set(k[:, 0].astype(k_cache.dtype))
            v_cache = v_cache.at[i, rows, positions].set(v[:, 0].astype(v_cache.dtype))
            keys, values = k_cache[i, :r, :attend], v_cache[i, :r, :attend]
            x = x + _attend(spec, params, p + "self_attn.", q, keys, values, mask)
            h = rms_norm(x, params[p + "post_attention_layernorm.weight"], spec.rms_eps)
            x = x + mlp(params, p + "mlp.", h)
        tokens, log_probs = sample(_logits(spec, params, x[:, 0]), sampling, filtered)
        return k_cache, v_cache, tokens, log_probs


jax.tree_util.register_dataclass(
    RowSampling, data_fields=["temperature", "top_k", "top_p", "min_p", "seed", "counter"], meta_fields=[]
)


def allocate_cache(spec: DenseSpec, max_batch: int, max_seq_len: int, dtype, device) -> tuple:
    shape = (spec.num_layers, max_batch + 1, max_seq_len, spec.num_kv_heads, spec.head_dim)
    return jnp.zeros(shape, dtype, device=device), jnp.zeros(shape, dtype, device=device)


__all__ = ["StepFunctions", "RowSampling", "allocate_cache", "bucket", "sample"]
