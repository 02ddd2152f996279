"""The dense families of the Megatron bridge (Llama, Qwen2 with qkv bias, Qwen3 with q/k norm) as pure JAX
functions over a flat parameter pytree keyed by HF tensor names.

Why no flax module tree: the HF name is the interchange format everywhere this model's weights go (load from
safetensors, export to an HF folder, weight buckets for the rollout engines, the sharding rules of
slime.training.jax.sharding). A `{hf_name: array}` dict is already a pytree that jit, grad, optax and
NamedSharding take as is, so loading and export are identity maps (bit-exact by construction) and no second
naming scheme has to be kept in step with HF's. The config-derived facts (shapes, rope, family flags) come from
the Megatron bridge, so both trainers accept and refuse exactly the same checkpoints.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from slime.models import bridge_class_for, load_hf_config

EMBED, LM_HEAD = "model.embed_tokens.weight", "lm_head.weight"


@dataclass(frozen=True)
class DenseSpec:
    """Everything the forward needs besides the parameters (hashable: a static argument of jit)."""

    vocab_size: int
    padded_vocab: int  # rows of the embedding / LM head as held by the trainer (a multiple of the TP degree)
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_eps: float
    qkv_bias: bool
    qk_norm: bool
    tied: bool
    inv_freq: tuple[float, ...]

    @property
    def head_name(self) -> str:
        return EMBED if self.tied else LM_HEAD


def spec_from_hf(hf_checkpoint: str | os.PathLike, vocab_multiple: int = 1) -> tuple[DenseSpec, dict]:
    """(spec, {hf_name: shape}) of an HF folder, validated by the Megatron bridge (same families, same refusals)."""
    hf_config = load_hf_config(hf_checkpoint)
    bridge = bridge_class_for(hf_config)(hf_config)
    vocab = hf_config.vocab_size
    spec = DenseSpec(
        vocab_size=vocab,
        padded_vocab=-(-vocab // vocab_multiple) * vocab_multiple,
        num_layers=hf_config.num_hidden_layers,
        num_heads=hf_config.num_attention_heads,
        num_kv_heads=bridge.num_kv_heads,
        head_dim=bridge.head_dim,
        rms_eps=float(hf_config.rms_norm_eps),
        qkv_bias=bridge.qkv_bias,
        qk_norm=bridge.qk_norm,
        tied=bridge.tied_embeddings,
        inv_freq=tuple(float(f) for f in bridge.rope_inv_freq().numpy()),
    )
    return spec, bridge.hf_shapes()


def load_hf_params(hf_checkpoint: str | os.PathLike, spec: DenseSpec, shapes: dict) -> tuple[dict, dict]:
    """({hf_name: fp32 numpy array}, {hf_name: stored dtype name}) read from the folder's safetensors files;
    shapes are checked (one line naming the tensor) and the vocabulary rows padded with zeros to padded_vocab."""
    from safetensors import safe_open

    from slime.models.gpt_bridge import CheckpointMismatch

    folder = Path(hf_checkpoint)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no *.safetensors files (only safetensors checkpoints are read)")
    params, dtypes = {}, {}
    for file in files:
        with safe_open(str(file), framework="flax") as handle:
            for name in handle.keys():  # noqa: SIM118 (safe_open handles are not iterable)
                if name not in shapes:
                    if name.endswith("rotary_emb.inv_freq") or (spec.tied and name == LM_HEAD):
                        continue
                    raise CheckpointMismatch(f"{file}: tensor {name} is not part of this model's config")
                tensor = handle.get_tensor(name)
                if tuple(tensor.shape) != tuple(shapes[name]):
                    raise CheckpointMismatch(
                        f"{file}: tensor {name} has shape {tuple(tensor.shape)} but config.json implies {shapes[name]}"
                    )
                dtypes[name] = str(tensor.dtype)
                params[name] = np.asarray(tensor.astype(jnp.float32))
    missing = sorted(set(shapes) - set(params))
    if missing:
        raise CheckpointMismatch(f"{folder}: tensor {missing[0]} is missing ({len(missing)} in all)")
    return pad_vocab(params, spec), dtypes


def pad_vocab(params: dict, spec: DenseSpec) -> dict:
    extra = spec.padded_vocab - spec.vocab_size
    if extra == 0:
        return params
    out = dict(params)
    for name in (EMBED, LM_HEAD):
        if name in out:
            out[name] = np.concatenate([out[name], np.zeros((extra, out[name].shape[1]), out[name].dtype)])
    return out


def hf_tensors(params: dict, spec: DenseSpec, dtypes: dict | None = None) -> dict[str, np.ndarray]:
    """Host numpy copies under HF names, vocabulary padding removed, each in its stored dtype (`dtypes`)."""
    out = {}
    for name in sorted(params):
        value = np.asarray(jax.device_get(params[name]))
        if name in (EMBED, LM_HEAD):
            value = value[: spec.vocab_size]
        if dtypes is not None and dtypes.get(name, "float32") != "float32":
            value = np.asarray(jnp.asarray(value).astype(dtypes[name]))
        out[name] = value
    return out


# ---- the forward ---------------------------------------------------------------------------------------
def _rms_norm(x, weight, eps):
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight * normed.astype(x.dtype)


def _rotate(x, cos, sin):
    """HF's rotate-half rope on [B, T, heads, D] with cos/sin [B, T, D]."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


def _linear(x, params, name, bias: bool = False):
    y = x @ params[name + ".weight"].T
    return y + params[name + ".bias"] if bias else y


def _attention(spec: DenseSpec, params: dict, prefix: str, x, cos, sin, mask):
    b, t, _ = x.shape
    d, heads, kv = spec.head_dim, spec.num_heads, spec.num_kv_heads
    q = _linear(x, params, prefix + "q_proj", spec.qkv_bias).reshape(b, t, heads, d)
    k = _linear(x, params, prefix + "k_proj", spec.qkv_bias).reshape(b, t, kv, d)
    v = _linear(x, params, prefix + "v_proj", spec.qkv_bias).reshape(b, t, kv, d)
    if spec.qk_norm:
        q = _rms_norm(q, params[prefix + "q_norm.weight"], spec.rms_eps)
        k = _rms_norm(k, params[prefix + "k_norm.weight"], spec.rms_eps)
    q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
    q = q.reshape(b, t, kv, heads // kv, d)  # query heads grouped by the KV head they share
    scores = jnp.einsum("bqgrd,bkgd->bgrqk", q, k).astype(jnp.float32) * (d**-0.5)
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bgrqk,bkgd->bqgrd", probs, v).reshape(b, t, heads * d)
    return _linear(out, params, prefix + "o_proj")


def _mlp(params: dict, prefix: str, x):
    gate = _linear(x, params, prefix + "gate_proj")
    up = _linear(x, params, prefix + "up_proj")
    return _linear(jax.nn.silu(gate) * up, params, prefix + "down_proj")


def hidden_states(spec: DenseSpec, params: dict, input_ids, position_ids):
    """Final-norm hidden states [B, T, H] of a causal forward (rows right-padded: causality alone suffices)."""
    x = params[EMBED][input_ids]
    freqs = position_ids[..., None].astype(jnp.float32) * jnp.asarray(spec.inv_freq, jnp.float32)
    angles = jnp.concatenate([freqs, freqs], axis=-1)
    cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
    t = input_ids.shape[1]
    mask = jnp.tril(jnp.ones((t, t), bool))[None, None, None]
    for i in range(spec.num_layers):
        p = f"model.layers.{i}."
        h = _rms_norm(x, params[p + "input_layernorm.weight"], spec.rms_eps)
        x = x + _attention(spec, params, p + "self_attn.", h, cos, sin, mask)
        h = _rms_norm(x, params[p + "post_attention_layernorm.weight"], spec.rms_eps)
        x = x + _mlp(params, p + "mlp.", h)
    return _rms_norm(x, params["model.norm.weight"], spec.rms_eps)


def lm_logits(spec: DenseSpec, params: dict, hidden):
    """Logits over the padded vocabulary; padding columns are the lowest float so they carry no probability."""
    logits = hidden @ params[spec.head_name].T
    if spec.padded_vocab == spec.vocab_size:
        return logits
    real = jnp.arange(spec.padded_vocab) < spec.vocab_size
    return jnp.where(real, logits, jnp.finfo(logits.dtype).min)


def forward(spec: DenseSpec, params: dict, input_ids, position_ids=None):
    """Logits [B, T, vocab_size] (padding columns dropped), for comparison with transformers."""
    if position_ids is None:
        position_ids = jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape)
    logits = lm_logits(spec, params, hidden_states(spec, params, input_ids, position_ids))
    return logits[..., : spec.vocab_size]
