"""A lean decoder for the HF families the trainer supports (Qwen2, Qwen3, Llama), built for serving.

Weights live in a few fused buffers (qkv, gate+up) so a decode step is a handful of large matmuls; each HF
tensor name maps to a view into those buffers (`ServingModel.hf_views`), so an HF-named weight update is a
plain in-place copy and never rebuilds the model. The KV cache is preallocated once:
[layers][slots, kv_heads, max_seq_len, head_dim], and a request owns one slot row for its lifetime.
Numerics follow transformers' implementations (RMSNorm in fp32, rotate-half RoPE, SDPA), so logits agree
with HF within float32 rounding.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from slime.errors import ModelError
from slime.models.moe import sparse_layer_flags
from slime.rollout.engines.embedded.moe import SparseMlp

SUPPORTED_MODEL_TYPES = ("qwen2", "qwen3", "llama", "qwen3_moe")


def packed_gemm_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether this torch build has the host-side packed GEMM ops (x86 builds with MKL)."""
    return (
        device.type == "cpu"
        and dtype == torch.float32
        and torch.backends.mkl.is_available()
        and hasattr(torch.ops.mkl, "_mkl_reorder_linear_weight")
    )


class ModelConfigError(ModelError):
    """The checkpoint's config.json describes something this model cannot serve (one line, names the field)."""


@dataclass(frozen=True)
class DecoderSpec:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    max_position_embeddings: int
    eos_token_ids: tuple[int, ...]
    # mixture of experts (qwen3_moe): which layers are sparse, and their router / expert shapes
    sparse_layers: tuple[bool, ...] = ()
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False

    @staticmethod
    def from_hf_config(config: dict, source: str = "config.json") -> DecoderSpec:
        model_type = config.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ModelConfigError(
                f"{source}: model_type {model_type!r} is not supported by the embedded engine "
                f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ModelConfigError(
                f"{source}: rope_type {rope_type!r} is not supported by the embedded engine (only 'default')"
            )
        rope_theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
        if config.get("hidden_act", "silu") != "silu":
            raise ModelConfigError(f"{source}: hidden_act {config.get('hidden_act')!r} is not supported (only 'silu')")
        if config.get("mlp_bias"):
            raise ModelConfigError(f"{source}: mlp_bias=true is not supported by the embedded engine")
        if config.get("use_sliding_window"):
            raise ModelConfigError(f"{source}: use_sliding_window=true is not supported by the embedded engine")
        num_heads = int(config["num_attention_heads"])
        head_dim = config.get("head_dim") or int(config["hidden_size"]) // num_heads
        eos = config.get("eos_token_id")
        eos_ids = () if eos is None else ((int(eos),) if isinstance(eos, int) else tuple(int(e) for e in eos))
        return DecoderSpec(
            model_type=model_type,
            vocab_size=int(config["vocab_size"]),
            hidden_size=int(config["hidden_size"]),
            intermediate_size=int(config["intermediate_size"]),
            num_layers=int(config["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(config.get("num_key_value_heads") or num_heads),
            head_dim=int(head_dim),
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2" or bool(config.get("attention_bias", False)),
            qk_norm=model_type in ("qwen3", "qwen3_moe"),
            max_position_embeddings=int(config.get("max_position_embeddings", 4096)),
            eos_token_ids=eos_ids,
            **_moe_fields(config),
        )

    @staticmethod
    def from_checkpoint(path: str) -> DecoderSpec:
        config_path = os.path.join(path, "config.json")
        if not os.path.isfile(config_path):
            raise ModelConfigError(f"{path}: no config.json; expected a HuggingFace checkpoint folder")
        with open(config_path) as f:
            spec = DecoderSpec.from_hf_config(json.load(f), source=config_path)
        if not spec.eos_token_ids:  # config.json leaves it null: generation_config.json or the tokenizer names it
            from slime.models.eos import resolve_eos

            spec = dataclasses.replace(spec, eos_token_ids=resolve_eos(path).ids)
        return spec


def _moe_fields(config: dict) -> dict:
    """Qwen3-MoE's fields; which layers are sparse is the trainer's rule (slime.models.moe.sparse_layer_flags)."""
    if config.get("model_type") != "qwen3_moe":
        return {}
    # hub checkpoints write num_experts; transformers >= 5 saves it as num_local_experts
    experts = int(config["num_experts"] if "num_experts" in config else config["num_local_experts"])
    step, dense = int(config.get("decoder_sparse_step", 1)), config.get("mlp_only_layers") or []
    sparse = sparse_layer_flags(int(config["num_hidden_layers"]), experts, dense, step)
    return dict(
        sparse_layers=tuple(sparse),
        num_experts=experts,
        num_experts_per_tok=int(config["num_experts_per_tok"]),
        moe_intermediate_size=int(config["moe_intermediate_size"]),
        norm_topk_prob=bool(config["norm_topk_prob"]),
    )


class _Layer:
    """One decoder layer's tensors. Fused buffers; HF names are views into them."""

    def __init__(self, spec: DecoderSpec, device: torch.device, dtype: torch.dtype, sparse: bool = False):
        h, hd = spec.hidden_size, spec.head_dim
        self.q_size = spec.num_heads * hd
        self.kv_size = spec.num_kv_heads * hd
        qkv_out = self.q_size + 2 * self.kv_size

        def empty(*shape: int) -> torch.Tensor:
            return torch.empty(*shape, device=device, dtype=dtype)

        self.qkv_weight = empty(qkv_out, h)
        self.qkv_bias = empty(qkv_out) if spec.qkv_bias else None
        self.o_weight = empty(h, self.q_size)
        self.moe = None
        if sparse:
            self.moe = SparseMlp(
                spec.num_experts, spec.num_experts_per_tok, spec.moe_intermediate_size, h, spec.norm_topk_prob,
                device, dtype,
            )  # fmt: skip
        ffn = 0 if sparse else spec.intermediate_size
        self.gate_up_weight = empty(2 * ffn, h)
        self.down_weight = empty(h, ffn)
        self.input_norm = empty(h)
        self.post_attention_norm = empty(h)
        self.q_norm = empty(hd) if spec.qk_norm else None
        self.k_norm = empty(hd) if spec.qk_norm else None

    def hf_views(self, prefix: str, intermediate: int) -> dict[str, torch.Tensor]:
        q, kv = self.q_size, self.kv_size
        views = {
            f"{prefix}.self_attn.q_proj.weight": self.qkv_weight[:q],
            f"{prefix}.self_attn.k_proj.weight": self.qkv_weight[q : q + kv],
            f"{prefix}.self_attn.v_proj.weight": self.qkv_weight[q + kv :],
            f"{prefix}.self_attn.o_proj.weight": self.o_weight,
            f"{prefix}.input_layernorm.weight": self.input_norm,
            f"{prefix}.post_attention_layernorm.weight": self.post_attention_norm,
        }
        if self.moe is not None:
            views.update(self.moe.hf_views(prefix))
        else:
            views[f"{prefix}.mlp.gate_proj.weight"] = self.gate_up_weight[:intermediate]
            views[f"{prefix}.mlp.up_proj.weight"] = self.gate_up_weight[intermediate:]
            views[f"{prefix}.mlp.down_proj.weight"] = self.down_weight
        if self.qkv_bias is not None:
            views[f"{prefix}.self_attn.q_proj.bias"] = self.qkv_bias[:q]
            views[f"{prefix}.self_attn.k_proj.bias"] = self.qkv_bias[q : q + kv]
            views[f"{prefix}.self_attn.v_proj.bias"] = self.qkv_bias[q + kv :]
        if self.q_norm is not None:
            views[f"{prefix}.self_attn.q_norm.weight"] = self.q_norm
            views[f"{prefix}.self_attn.k_norm.weight"] = self.k_norm
        return views


class ServingModel:
    """Forward passes over a static KV cache. Not an nn.Module: no autograd, no hooks, no module tree."""

    def __init__(
        self, spec: DecoderSpec, max_slots: int, max_seq_len: int, device: str | torch.device, dtype: torch.dtype
    ):
        self.spec = spec
        self.device = torch.device(device)
        self.dtype = dtype
        self.max_slots = max_slots
        self.max_seq_len = max_seq_len
        self.embed = torch.empty(spec.vocab_size, spec.hidden_size, device=self.device, dtype=dtype)
        self.final_norm = torch.empty(spec.hidden_size, device=self.device, dtype=dtype)
        self.lm_head = self.embed if spec.tie_word_embeddings else torch.empty_like(self.embed)
        sparse = spec.sparse_layers or (False,) * spec.num_layers
        self.layers = [_Layer(spec, self.device, dtype, sparse[i]) for i in range(spec.num_layers)]
        # when a list: each forward appends, per sparse layer, the expert ids [tokens, k] it routed to
        self.routed_experts: list[torch.Tensor] | None = None
        self.hf_views: dict[str, torch.Tensor] = {
            "model.embed_tokens.weight": self.embed,
            "model.norm.weight": self.final_norm,
        }
        if not spec.tie_word_embeddings:
            self.hf_views["lm_head.weight"] = self.lm_head
        for i, layer in enumerate(self.layers):
            self.hf_views.update(layer.hf_views(f"model.layers.{i}", spec.intermediate_size))
        # HF checkpoints of tied models sometimes carry lm_head.weight too; it is the embedding.
        self.tied_aliases = {"lm_head.weight": "model.embed_tokens.weight"} if spec.tie_word_embeddings else {}
        self._build_rope()
        self._packed: dict[int, torch.Tensor] = {}
        self._packed_stale = True  # packed weights are rebuilt on the first decode after a weight change
        self.k_cache: list[torch.Tensor] = []
        self.v_cache: list[torch.Tensor] = []
        self.allocate_kv_cache()

    # ---- setup ---------------------------------------------------------------------------------------
    def _build_rope(self) -> None:
        hd = self.spec.head_dim
        inv_freq = 1.0 / (self.spec.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
        positions = torch.arange(self.max_seq_len, dtype=torch.float32)
        freqs = torch.outer(positions, inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        # HF computes cos/sin in fp32 and casts to the activation dtype; so do we.
        self.rope_cos = emb.cos().to(self.device, self.dtype)
        sin = emb.sin()
        # rotate_half(x) * sin == swap_halves(x) * [-sin_1, sin_2]: one op less per rotation, same rounding
        # (a sign flip is exact).
        half = hd // 2
        self.rope_sin_signed = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1).to(self.device, self.dtype)

    @property
    def scratch_position(self) -> int:
        return self.max_seq_len - 1

    def allocate_kv_cache(self) -> None:
        shape = (self.max_slots, self.spec.num_kv_heads, self.max_seq_len, self.spec.head_dim)
        self.k_cache = [torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in self.layers]
        self.v_cache = [torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in self.layers]

    def free_kv_cache(self) -> None:
        self.k_cache, self.v_cache = [], []

    @property
    def kv_cache_allocated(self) -> bool:
        return bool(self.k_cache)

    def kv_cache_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k_cache + self.v_cache)

    def resolve_name(self, name: str) -> str:
        return self.tied_aliases.get(name, name)

    # ---- math ----------------------------------------------------------------------------------------
    def _rms_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # HF's order of operations (so fp32 results are bit-identical): normalize in fp32, cast back, scale.
        # In-place steps on the small statistics tensor, and no cast when x is already fp32, because
        # these tiny ops dominate a decode step's host time.
        # sum * (1/H) instead of mean: fewer kernels (mean = sum, divide, copy), and the same bits whenever
        # H is a power of two (1/H is then exact), as hidden sizes and head dims usually are.
        xf = x if x.dtype == torch.float32 else x.float()
        inv_rms = (xf * xf).sum(-1, keepdim=True).mul_(1.0 / x.shape[-1]).add_(self.spec.rms_norm_eps).rsqrt_()
        normed = xf * inv_rms
        return weight * (normed if x.dtype == torch.float32 else normed.to(x.dtype))

    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return x * cos + torch.cat((x[..., half:], x[..., :half]), dim=-1) * sin_signed

    def _rope_tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin for positions [B, T] -> [B, T, 1, hd] each (gathered once per forward)."""
        return self.rope_cos[positions].unsqueeze(2), self.rope_sin_signed[positions].unsqueeze(2)

    def _qkv(
        self, layer: _Layer, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], linear=F.linear
    ) -> tuple[torch.Tensor, ...]:
        """x [B, T, H] -> q [B, nh, T, hd], k and v [B, nkv, T, hd], RoPE applied."""
        spec = self.spec
        b, t, _ = x.shape
        qkv = linear(x, layer.qkv_weight, layer.qkv_bias)
        q, k, v = qkv.split((layer.q_size, layer.kv_size, layer.kv_size), dim=-1)
        q = q.view(b, t, spec.num_heads, spec.head_dim)
        k = k.view(b, t, spec.num_kv_heads, spec.head_dim)
        v = v.view(b, t, spec.num_kv_heads, spec.head_dim)
        if layer.q_norm is not None:
            q = self._rms_norm(q, layer.q_norm)
            k = self._rms_norm(k, layer.k_norm)
        cos, sin = rope
        q = self._rotate(q, cos, sin).transpose(1, 2)
        k = self._rotate(k, cos, sin).transpose(1, 2)
        return q, k, v.transpose(1, 2)

    def _mlp_and_residual(
        self, layer: _Layer, hidden: torch.Tensor, attn: torch.Tensor, linear=F.linear
    ) -> torch.Tensor:
        hidden = hidden + linear(attn, layer.o_weight)
        x = self._rms_norm(hidden, layer.post_attention_norm)
        if layer.moe is not None:
            return hidden + layer.moe(x, self.routed_experts)
        gate, up = linear(x, layer.gate_up_weight).chunk(2, dim=-1)
        return hidden + linear(F.silu(gate) * up, layer.down_weight)

    def _decode_attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, future: torch.Tensor
    ) -> torch.Tensor:
        """One query per row: q [n, nh, 1, hd], k/v [n, nkv, S, hd], future [n, 1, 1, S] -> [n, 1, nh*hd].

        Written as two batched matmuls over (row, kv head) with the query heads of a group stacked, which
        on CPU is several times cheaper than SDPA's general kernel for a single query position.
        """
        n, nh, _, hd = q.shape
        nkv = k.shape[1]
        qg = q.view(n, nkv, nh // nkv, hd)
        scores = torch.matmul(qg, k.transpose(-1, -2)) * (hd**-0.5)
        scores = scores.masked_fill_(future, float("-inf")).softmax(dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.matmul(scores, v).view(n, 1, nh * hd)

    def _logits(self, hidden: torch.Tensor, linear=F.linear) -> torch.Tensor:
        return linear(self._rms_norm(hidden, self.final_norm), self.lm_head).float()

    # ---- packed decode matmuls ------------------------------------------------------------------------
    def weights_changed(self) -> None:
        """The packed decode weights are derived from the weights: drop them, to be rebuilt on the next decode
        (so a weight update returns once the weights are in place, and the repack runs with generation)."""
        self._packed = {}
        self._packed_stale = True

    def pack_for_decode(self) -> None:
        """Pre-pack the decode matmul weights for a full batch of max_slots rows, where the torch build
        offers packed GEMM for this device and dtype (MKL on x86 hosts; measured ~1.4x on decode-sized
        matmuls, bit-identical results). Call again after any weight change; a no-op elsewhere."""
        self._packed = {}
        self._packed_stale = False
        if not packed_gemm_supported(self.device, self.dtype):
            return
        weights = [self.lm_head]
        for layer in self.layers:
            weights += [layer.qkv_weight, layer.o_weight]
            weights += [layer.gate_up_weight, layer.down_weight] if layer.moe is None else []
        for w in weights:
            self._packed[w.data_ptr()] = torch.ops.mkl._mkl_reorder_linear_weight(w, self.max_slots)

    def _packed_linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        packed = self._packed.get(weight.data_ptr())
        if packed is None:
            return F.linear(x, weight, bias)
        return torch.ops.mkl._mkl_linear(x, packed, weight, bias, self.max_slots)

    # ---- forward passes ------------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(
        self, tokens: torch.Tensor, lengths: torch.Tensor, slots: torch.Tensor, all_logits: bool = False
    ) -> torch.Tensor:
        """Run right-padded prompts [B, T] from position 0, fill their cache slots.

        Returns logits at each prompt's last token [B, V] (or at every position [B, T, V] with all_logits).
        Causal attention makes the right padding invisible to the real positions; the padded positions'
        cache entries are overwritten by decode before any query can see them.
        """
        b, t = tokens.shape
        positions = torch.arange(t, device=self.device).expand(b, t)
        hidden = F.embedding(tokens, self.embed)
        rope = self._rope_tables(positions)
        for i, layer in enumerate(self.layers):
            x = self._rms_norm(hidden, layer.input_norm)
            q, k, v = self._qkv(layer, x, rope)
            self.k_cache[i][slots, :, :t] = k
            self.v_cache[i][slots, :, :t] = v
            attn = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            hidden = self._mlp_and_residual(layer, hidden, attn.transpose(1, 2).reshape(b, t, -1))
        if all_logits:
            return self._logits(hidden)
        last = hidden[torch.arange(b, device=self.device), lengths - 1]
        return self._logits(last)

    @torch.inference_mode()
    def copy_prompt_cache(self, sources: list[int], targets: list[int], length: int) -> None:
        """Give each target slot its source slot's first `length` cache positions (a prompt prefilled once and
        shared by its group), in one copy per layer for all of them. Positions past a source's own prompt hold
        prefill padding: the target's decode overwrites each before any query can see it."""
        if not targets:
            return
        src = torch.tensor(sources, device=self.device)
        dst = torch.tensor(targets, device=self.device)
        for k_cache, v_cache in zip(self.k_cache, self.v_cache):
            k_cache[dst, :, :length] = k_cache[src, :, :length]
            v_cache[dst, :, :length] = v_cache[src, :, :length]

    @torch.inference_mode()
    def decode(
        self, tokens: torch.Tensor, positions: torch.Tensor, attend_len: int, slots: torch.Tensor | None = None
    ) -> torch.Tensor:
        """One token per row: tokens [n] at positions [n]. Returns logits [n, V].

        Without `slots`, row i is slot i, so the cache is read through a slice, never gathered; rows that are not
        running (free slots, slots prefilled this very iteration) must be given position `scratch_position`:
        the last cache position, which no sequence ever writes or reads (a sequence ends when it reaches
        max_seq_len tokens), so they disturb nothing. With `slots` [n], row i is slot slots[i] and the cache
        rows are gathered: cheaper when few of the low slots run. attend_len = (max position of the real
        rows) + 1 bounds the attention span; a per-row mask hides each row's future.
        """
        if self._packed_stale:
            self.pack_for_decode()
        n = real_rows = tokens.shape[0]
        linear = F.linear
        # With packed weights, a batch padded to max_slots rows is cheaper than an unpacked smaller one
        # down to ~2/3 occupancy; the padding rows are free slots (they write only their own cache row).
        if slots is None and self._packed and n * 3 >= self.max_slots * 2:
            tokens = F.pad(tokens, (0, self.max_slots - n))
            positions = F.pad(positions, (0, self.max_slots - n), value=self.scratch_position)
            n, linear = self.max_slots, self._packed_linear
        rows = torch.arange(n, device=self.device) if slots is None else slots
        hidden = F.embedding(tokens.view(n, 1), self.embed)
        pos2d = positions.view(n, 1)
        rope = self._rope_tables(pos2d)
        future = (torch.arange(attend_len, device=self.device).view(1, attend_len) > pos2d).view(n, 1, 1, attend_len)
        for i, layer in enumerate(self.layers):
            x = self._rms_norm(hidden, layer.input_norm)
            q, k, v = self._qkv(layer, x, rope, linear)
            k_cache, v_cache = self.k_cache[i], self.v_cache[i]
            k_cache[rows, :, positions] = k[:, :, 0]
            v_cache[rows, :, positions] = v[:, :, 0]
            if slots is None:
                keys, values = k_cache[:n, :, :attend_len], v_cache[:n, :, :attend_len]
            else:
                keys, values = k_cache[slots, :, :attend_len], v_cache[slots, :, :attend_len]
            attn = self._decode_attention(q, keys, values, future)
            hidden = self._mlp_and_residual(layer, hidden, attn, linear)
        return self._logits(hidden[:, 0], linear)[:real_rows]
