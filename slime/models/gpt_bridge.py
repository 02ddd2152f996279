"""Dense decoder-only families (Llama / Qwen2 / Qwen3 layout) as a megatron-core GPTModel.

The bridge knows three things about a family: the TransformerConfig that reproduces it, the HF tensor
names and shapes its config implies, and how each HF tensor maps onto megatron's (tensor-parallel)
parameters. Layout facts, for the local layer spec:
  * linear_qkv rows are interleaved per KV group: [q heads of group g, k of g, v of g] for g in groups;
    a TP rank owns a contiguous run of groups, so its shard is a contiguous row block of that layout.
  * linear_fc1 = [gate; up]; a TP rank holds [gate shard; up shard].
  * pre_mlp_layernorm <- post_attention_layernorm; q/k layernorm <- q_norm/k_norm.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F

from slime.errors import FlagError, ModelError


class CheckpointMismatch(ModelError):
    """One-line, user-facing: a checkpoint tensor is missing, unexpected, or has the wrong shape."""


def load_hf_config(hf_checkpoint: str | os.PathLike):
    from transformers import AutoConfig

    path = Path(hf_checkpoint)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no config.json (expected a HuggingFace model folder)")
    return AutoConfig.from_pretrained(str(path))


# How a megatron parameter is split across tensor-parallel ranks (VOCAB: rows of the padded vocabulary).
REPLICATED, ROWS, COLUMNS, QKV, GATE_UP = "replicated", "rows", "columns", "qkv", "gate_up"
VOCAB = "vocab"
# The logit of a padding id: exp() of it is 0 in every float dtype, and it stays finite after / temperature.
PADDED_LOGIT = -1e4


@dataclass(frozen=True)
class ParamMap:
    """One megatron parameter and the HF tensor(s) it is made of."""

    megatron_name: str
    hf_names: tuple[str, ...]  # one name, or (q, k, v) for QKV, or (gate, up) for GATE_UP
    split: str  # REPLICATED | ROWS (dim 0) | COLUMNS (dim 1) | QKV | GATE_UP


class GPTBridge:
    """Base for the dense families. Subclasses set the class flags and are registered by model_type."""

    qkv_bias: ClassVar[bool] = False
    qk_norm: ClassVar[bool] = False
    has_experts: ClassVar[bool] = False  # MoE families (slime.models.moe)

    def __init__(
        self,
        hf_config,
        tensor_parallel_size: int = 1,
        tensor_parallel_rank: int = 0,
        *,
        make_vocab_size_divisible_by: int = 1,
        expert_parallel_size: int = 1,
        expert_parallel_rank: int = 0,
    ):
        self.hf_config = hf_config
        self.tp_size = tensor_parallel_size
        self.tp_rank = tensor_parallel_rank
        self.vocab_multiple = make_vocab_size_divisible_by
        self.ep_size = expert_parallel_size  # only MoE families use these (slime.models.moe)
        self.ep_rank = expert_parallel_rank
        self._validate()

    # ---- vocabulary padding -------------------------------------------------------------------
    # As Megatron pads (--make-vocab-size-divisible-by): the trainer's embedding and output layer hold
    # padded_vocab_size rows, a multiple of the multiple times the TP size, so every rank gets an equal slice.
    # The extra rows are zero, their logits are masked out of the softmax, and they never leave the trainer:
    # HF export and weight sync cut them off.
    @property
    def padded_vocab_size(self) -> int:
        step = self.vocab_multiple * self.tp_size
        return -(-self.hf_config.vocab_size // step) * step

    def _pad_vocab_rows(self, tensor: torch.Tensor) -> torch.Tensor:
        extra = self.padded_vocab_size - tensor.shape[0]
        return tensor if extra == 0 else torch.cat([tensor, tensor.new_zeros(extra, *tensor.shape[1:])])

    def _mask_padded_logits(self, module, inputs, output):
        """Forward hook on the output layer: this rank's logits of padded ids become very negative (finite, so
        that entropy's p * log p stays 0 rather than NaN), so softmax and log-probs equal the unpadded model's."""
        logits, bias = output
        local = logits.shape[-1]
        first_padded = self.hf_config.vocab_size - self.tp_rank * local
        if first_padded >= local:
            return output
        ids = torch.arange(local, device=logits.device)
        return logits.masked_fill(ids >= max(first_padded, 0), PADDED_LOGIT), bias

    # ---- config -------------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        cfg = self.hf_config
        head_dim = cfg.head_dim if "head_dim" in cfg.to_dict() and cfg.head_dim else None
        return head_dim or cfg.hidden_size // cfg.num_attention_heads

    @property
    def num_kv_heads(self) -> int:
        cfg = self.hf_config
        return cfg.num_key_value_heads or cfg.num_attention_heads

    @property
    def tied_embeddings(self) -> bool:
        return bool(self.hf_config.tie_word_embeddings)

    def _validate(self) -> None:
        cfg = self.hf_config
        family = f"{cfg.model_type} config"
        if cfg.hidden_act != "silu":
            raise _unsupported(f"{family}: hidden_act={cfg.hidden_act!r}; only 'silu' (SwiGLU) is supported")
        heads, groups, tp = cfg.num_attention_heads, self.num_kv_heads, self.tp_size
        if heads % groups:
            raise _unsupported(
                f"{family}: num_attention_heads={heads} is not a multiple of num_key_value_heads={groups}"
            )
        if heads % tp or groups % tp:
            raise FlagError(
                f"--tensor-model-parallel-size {tp} must divide num_attention_heads={heads} and "
                f"num_key_value_heads={groups} of the {cfg.model_type} model"
            )
        if self.vocab_multiple < 1:
            raise FlagError(f"--make-vocab-size-divisible-by must be >= 1, got {self.vocab_multiple}")
        if cfg.intermediate_size % tp:
            raise FlagError(
                f"--tensor-model-parallel-size {tp} must divide intermediate_size={cfg.intermediate_size} "
                f"of the {cfg.model_type} model"
            )
        self.rope_inv_freq()  # unsupported rope types fail here, before a model is built

    def rope_parameters(self) -> dict:
        cfg = self.hf_config
        if "rope_parameters" in cfg.to_dict() and cfg.rope_parameters:
            return dict(cfg.rope_parameters)
        return {"rope_type": "default", "rope_theta": cfg.rope_theta, **(cfg.rope_scaling or {})}

    def rope_inv_freq(self) -> torch.Tensor:
        """HF's inverse frequencies (exactly), for the default and the llama3 / linear rope types."""
        params = self.rope_parameters()
        rope_type = params.get("rope_type", params.get("type", "default"))
        dim = self.head_dim
        if rope_type == "default":
            return 1.0 / (params["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        if rope_type not in ("llama3", "linear"):
            raise _unsupported(
                f"{self.hf_config.model_type} config: rope_type {rope_type!r} is not supported (default, llama3, linear)"
            )
        inv_freq, attention_scaling = ROPE_INIT_FUNCTIONS[rope_type](self.hf_config, torch.device("cpu"))
        return inv_freq.float()

    def transformer_config(self, **overrides):
        from megatron.core.transformer import TransformerConfig

        cfg = self.hf_config
        settings = dict(
            num_layers=cfg.num_hidden_layers,
            hidden_size=cfg.hidden_size,
            ffn_hidden_size=cfg.intermediate_size,
            num_attention_heads=cfg.num_attention_heads,
            num_query_groups=self.num_kv_heads,
            kv_channels=self.head_dim,
            normalization="RMSNorm",
            layernorm_epsilon=cfg.rms_norm_eps,
            gated_linear_unit=True,
            activation_func=F.silu,
            add_bias_linear=False,
            add_qkv_bias=self.qkv_bias,
            qk_layernorm=self.qk_norm,
            hidden_dropout=0.0,
            attention_dropout=0.0,
            tensor_model_parallel_size=self.tp_size,
            use_cpu_initialization=True,
            perform_initialization=False,  # every weight is overwritten from the checkpoint
            params_dtype=torch.float32,
            bias_activation_fusion=False,
            masked_softmax_fusion=False,
            persist_layer_norm=False,
            bias_dropout_fusion=False,
            apply_rope_fusion=False,
            gradient_accumulation_fusion=False,
        )
        settings.update(overrides)
        return TransformerConfig(**settings)

    def build_model(self, **config_overrides):
        """An uninitialised GPTModel for this config and TP rank (call load_hf / load_state after)."""
        from megatron.core.models.gpt import GPTModel

        cfg = self.hf_config
        model = GPTModel(
            config=self.transformer_config(**config_overrides),
            transformer_layer_spec=self.block_spec(),
            vocab_size=self.padded_vocab_size,
            max_sequence_length=cfg.max_position_embeddings,
            share_embeddings_and_output_weights=self.tied_embeddings,
            position_embedding_type="rope",
        )
        with torch.no_grad():
            model.rotary_pos_emb.inv_freq = self.rope_inv_freq()
        self._mark_tensor_parallel(model)
        if self.padded_vocab_size != cfg.vocab_size:
            model.output_layer.register_forward_hook(self._mask_padded_logits)
        return model

    def layer_spec(self, num_experts: int | None = None):
        """megatron's local layer spec (a MoE MLP when `num_experts` is given), attention through SDPA, slime's RMSNorm."""
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

        from slime.models.attention import SdpaCoreAttention
        from slime.models.rms_norm import RMSNorm

        spec = copy.deepcopy(
            get_gpt_layer_local_spec(num_experts=num_experts, qk_layernorm=self.qk_norm, normalization="RMSNorm")
        )
        layer, attention = spec.submodules, spec.submodules.self_attention.submodules
        attention.core_attention = SdpaCoreAttention
        layer.input_layernorm = layer.pre_mlp_layernorm = RMSNorm
        if self.qk_norm:
            attention.q_layernorm = attention.k_layernorm = RMSNorm
        return spec

    def block_spec(self):
        """The decoder: every layer's spec and the final norm."""
        from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

        from slime.models.rms_norm import RMSNorm

        layers = [self.layer_spec()] * self.hf_config.num_hidden_layers
        return TransformerBlockSubmodules(layer_specs=layers, layer_norm=RMSNorm)

    def _mark_tensor_parallel(self, model) -> None:
        """Tag sharded parameters the way megatron's initialisers would (skipped with perform_initialization
        off); the optimizer's grad norm counts replicated parameters once and sharded ones on every rank."""
        from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

        params = dict(model.named_parameters())
        for pm in self.param_maps():
            if pm.split != REPLICATED:
                param = params[pm.megatron_name]
                for attr in ("tensor_model_parallel", "partition_dim", "partition_stride"):
                    if hasattr(param, attr):
                        delattr(param, attr)
                set_tensor_model_parallel_attributes(param, True, 1 if pm.split == COLUMNS else 0, 1)

    # ---- the name map -------------------------------------------------------------------------
    def param_maps(self) -> list[ParamMap]:
        maps = [ParamMap("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), VOCAB)]
        for i in range(self.hf_config.num_hidden_layers):
            hf, mg = f"model.layers.{i}.", f"decoder.layers.{i}."
            attn = hf + "self_attn."
            maps += [
                ParamMap(mg + "input_layernorm.weight", (hf + "input_layernorm.weight",), REPLICATED),
                ParamMap(
                    mg + "self_attention.linear_qkv.weight",
                    (attn + "q_proj.weight", attn + "k_proj.weight", attn + "v_proj.weight"),
                    QKV,
                ),
                ParamMap(mg + "self_attention.linear_proj.weight", (attn + "o_proj.weight",), COLUMNS),
                ParamMap(mg + "pre_mlp_layernorm.weight", (hf + "post_attention_layernorm.weight",), REPLICATED),
                ParamMap(
                    mg + "mlp.linear_fc1.weight", (hf + "mlp.gate_proj.weight", hf + "mlp.up_proj.weight"), GATE_UP
                ),
                ParamMap(mg + "mlp.linear_fc2.weight", (hf + "mlp.down_proj.weight",), COLUMNS),
            ]
            if self.qkv_bias:
                maps.append(
                    ParamMap(
                        mg + "self_attention.linear_qkv.bias",
                        (attn + "q_proj.bias", attn + "k_proj.bias", attn + "v_proj.bias"),
                        QKV,
                    )
                )
            if self.qk_norm:
                maps += [
                    ParamMap(mg + "self_attention.q_layernorm.weight", (attn + "q_norm.weight",), REPLICATED),
                    ParamMap(mg + "self_attention.k_layernorm.weight", (attn + "k_norm.weight",), REPLICATED),
                ]
        maps.append(ParamMap("decoder.final_layernorm.weight", ("model.norm.weight",), REPLICATED))
        if not self.tied_embeddings:
            maps.append(ParamMap("output_layer.weight", ("lm_head.weight",), VOCAB))
        return maps

    def hf_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every HF tensor this config implies, with its full (unsharded) shape."""
        cfg = self.hf_config
        h, d, ffn = cfg.hidden_size, self.head_dim, cfg.intermediate_size
        q_out, kv_out = cfg.num_attention_heads * d, self.num_kv_heads * d
        shapes = {"model.embed_tokens.weight": (cfg.vocab_size, h), "model.norm.weight": (h,)}
        if not self.tied_embeddings:
            shapes["lm_head.weight"] = (cfg.vocab_size, h)
        for i in range(cfg.num_hidden_layers):
            p = f"model.layers.{i}."
            shapes.update(
                {
                    p + "input_layernorm.weight": (h,),
                    p + "post_attention_layernorm.weight": (h,),
                    p + "self_attn.q_proj.weight": (q_out, h),
                    p + "self_attn.k_proj.weight": (kv_out, h),
                    p + "self_attn.v_proj.weight": (kv_out, h),
                    p + "self_attn.o_proj.weight": (h, q_out),
                    p + "mlp.gate_proj.weight": (ffn, h),
                    p + "mlp.up_proj.weight": (ffn, h),
                    p + "mlp.down_proj.weight": (h, ffn),
                }
            )
            if self.qkv_bias:
                shapes.update(
                    {
                        p + "self_attn.q_proj.bias": (q_out,),
                        p + "self_attn.k_proj.bias": (kv_out,),
                        p + "self_attn.v_proj.bias": (kv_out,),
                    }
                )
            if self.qk_norm:
                shapes.update({p + "self_attn.q_norm.weight": (d,), p + "self_attn.k_norm.weight": (d,)})
        return shapes

    # ---- HF (full) -> megatron (this rank's shard) ----------------------------------------------
    def _interleave_qkv(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        groups, d = self.num_kv_heads, self.head_dim
        per_group = self.hf_config.num_attention_heads // groups
        tail = q.shape[1:]
        q = q.reshape(groups, per_group * d, *tail)
        k = k.reshape(groups, d, *tail)
        v = v.reshape(groups, d, *tail)
        return torch.cat([q, k, v], dim=1).reshape(-1, *tail)

    def _deinterleave_qkv(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        groups, d = self.num_kv_heads, self.head_dim
        per_group = self.hf_config.num_attention_heads // groups
        tail = qkv.shape[1:]
        grouped = qkv.reshape(groups, (per_group + 2) * d, *tail)
        q, k, v = torch.split(grouped, [per_group * d, d, d], dim=1)
        return q.reshape(-1, *tail), k.reshape(-1, *tail), v.reshape(-1, *tail)

    def to_megatron_shard(self, pm: ParamMap, hf_tensors: list[torch.Tensor]) -> torch.Tensor:
        tp, rank = self.tp_size, self.tp_rank
        if pm.split == REPLICATED:
            return hf_tensors[0]
        if pm.split == ROWS:
            return hf_tensors[0].chunk(tp, dim=0)[rank]
        if pm.split == VOCAB:
            return self._pad_vocab_rows(hf_tensors[0]).chunk(tp, dim=0)[rank]
        if pm.split == COLUMNS:
            return hf_tensors[0].chunk(tp, dim=1)[rank]
        if pm.split == QKV:
            return self._interleave_qkv(*hf_tensors).chunk(tp, dim=0)[rank]
        if pm.split == GATE_UP:
            gate, up = hf_tensors
            return torch.cat([gate.chunk(tp, dim=0)[rank], up.chunk(tp, dim=0)[rank]], dim=0)
        raise AssertionError(pm.split)

    def to_hf(self, pm: ParamMap, shards: list[torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
        """Full HF tensors from the shards of every TP rank (in rank order). With one shard (TP=1) the results
        are views of the parameters, not copies: weight sync copies each byte once, into the engine."""

        def joined(parts: list[torch.Tensor], dim: int) -> torch.Tensor:
            return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)

        if pm.split == REPLICATED:
            full = [shards[0]]
        elif pm.split == ROWS:
            full = [joined(shards, 0)]
        elif pm.split == VOCAB:  # padding rows never leave the trainer
            full = [joined(shards, 0)[: self.hf_config.vocab_size]]
        elif pm.split == COLUMNS:
            full = [joined(shards, 1)]
        elif pm.split == QKV:
            full = list(self._deinterleave_qkv(joined(shards, 0)))
        elif pm.split == GATE_UP:
            halves = [s.chunk(2, dim=0) for s in shards]
            full = [joined([h[0] for h in halves], 0), joined([h[1] for h in halves], 0)]
        else:
            raise AssertionError(pm.split)
        return list(zip(pm.hf_names, full))

    # ---- checkpoint I/O -------------------------------------------------------------------------
    def check_hf_tensors(self, hf_checkpoint: str | os.PathLike) -> _SafetensorsFolder:
        """The checkpoint's tensors, every name and shape checked against config.json (reads headers only)."""
        reader = _SafetensorsFolder(Path(hf_checkpoint))
        expected = self.hf_shapes()
        missing = [name for name in expected if name not in reader.names]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise CheckpointMismatch(f"{hf_checkpoint}: tensor {missing[0]} is missing{more}")
        ignorable = ("rotary_emb.inv_freq",) + (("lm_head.weight",) if self.tied_embeddings else ())
        unexpected = [n for n in reader.names if n not in expected and not n.endswith(ignorable)]
        if unexpected:
            raise CheckpointMismatch(
                f"{hf_checkpoint}: tensor {unexpected[0]} is not part of a {self.hf_config.model_type} model with this config"
            )
        for name, shape in expected.items():
            found = reader.shape(name)
            if tuple(found) != tuple(shape):
                raise CheckpointMismatch(
                    f"{reader.file_of(name)}: tensor {name} has shape {tuple(found)} but config.json implies {tuple(shape)}"
                )
        return reader

    def load_hf(self, model: torch.nn.Module, hf_checkpoint: str | os.PathLike) -> None:
        """Copy an HF safetensors checkpoint into `model` (this rank's shards), checking every shape."""
        reader = self.check_hf_tensors(hf_checkpoint)
        params = dict(model.named_parameters())
        with torch.no_grad():
            for pm in self.param_maps():
                shard = self.to_megatron_shard(pm, [reader.get(n).float() for n in pm.hf_names])
                target = params[pm.megatron_name]
                if target.shape != shard.shape:
                    raise CheckpointMismatch(
                        f"megatron parameter {pm.megatron_name} has shape {tuple(target.shape)} but {pm.hf_names[0]} "
                        f"gives {tuple(shard.shape)} at tensor_parallel_size={self.tp_size}"
                    )
                target.copy_(shard.to(target.dtype))

    def export_hf(
        self,
        model: torch.nn.Module,
        gather: Callable[[torch.Tensor], list[torch.Tensor]],
        gather_experts: Callable[[torch.Tensor], list[torch.Tensor]] | None = None,
        params: dict[str, torch.Tensor] | None = None,
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """HF-named full tensors; `gather` returns one tensor's shards from all TP ranks (collective);
        `gather_experts` the same tensor from every expert-parallel rank (MoE families only); `params`: the
        tensors to export by megatron name, in place of the model's own (LoRA's merged weights)."""
        params = dict(model.named_parameters()) if params is None else params
        for pm in self.param_maps():
            yield from self.to_hf(pm, self._tp_shards(pm, params, gather))

    def _tp_shards(self, pm: ParamMap, params: dict, gather: Callable) -> list[torch.Tensor]:
        local = params[pm.megatron_name].detach()
        return [local] if pm.split == REPLICATED or self.tp_size == 1 else gather(local)


def _unsupported(message: str):
    from slime.models.registry import UnsupportedModel

    return UnsupportedModel(message)


class _SafetensorsFolder:
    """Tensor names, shapes and data across the .safetensors files of one HF folder (lazily read)."""

    def __init__(self, folder: Path):
        from safetensors import safe_open

        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise ModelError(f"{folder}: no *.safetensors files (only safetensors checkpoints are read)")
        self._handles = {}
        for f in files:
            try:
                self._handles[f] = safe_open(str(f), framework="pt")
            except Exception as exc:  # safetensors raises its own SafetensorError (or OSError) for a damaged file
                raise ModelError(f"{f}: not a readable safetensors file ({str(exc).strip()[:200]})") from None
        self._where: dict[str, Path] = {}
        for f, handle in self._handles.items():
            for name in handle.keys():  # noqa: SIM118 -- safetensors handles are not iterable
                self._where[name] = f

    @property
    def names(self) -> set[str]:
        return set(self._where)

    def file_of(self, name: str) -> Path:
        return self._where[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handles[self._where[name]].get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        return self._handles[self._where[name]].get_tensor(name)


def write_hf_index(folder: Path, weight_map: dict[str, str], total_bytes: int) -> None:
    with open(folder / "model.safetensors.index.json", "w") as f:
        json.dump({"metadata": {"total_size": total_bytes}, "weight_map": weight_map}, f, indent=1)
