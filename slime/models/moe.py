"""Qwen3-MoE (HF `Qwen3MoeForCausalLM`) as a megatron-core GPTModel with MoE layers.

Layout facts, for megatron's local layer spec with SequentialMLP experts:
  * A layer is sparse when HF's rule says so: not in `mlp_only_layers` and (i + 1) % decoder_sparse_step == 0;
    the others keep Qwen3's dense MLP (intermediate_size). The pattern goes to megatron as `moe_layer_freq`.
  * router.weight <- mlp.gate.weight ([experts, hidden], replicated over TP).
  * HF softmaxes all router logits, takes the top-k and (norm_topk_prob) renormalises them; megatron's softmax
    over the top-k logits gives the same weights (and the same choice: softmax is monotonic). Without
    norm_topk_prob, megatron's pre-softmax routing keeps the unnormalised top-k probabilities as HF does.
  * Expert e lives on expert-parallel rank e // local_experts as local expert e % local_experts; its
    linear_fc1 = [gate; up] and linear_fc2 = down, split over the expert tensor-parallel group like a dense MLP.
On disk (and in weight sync) experts are per-expert tensors `mlp.experts.{e}.{gate,up,down}_proj.weight`,
the format HF checkpoints use.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator

import torch

from slime.models.dense import Qwen3Bridge
from slime.models.gpt_bridge import COLUMNS, GATE_UP, REPLICATED, ParamMap
from slime.models.registry import UnsupportedModel, register_bridge

_LOCAL_EXPERT = re.compile(r"^decoder\.layers\.(\d+)\.mlp\.experts\.local_experts\.(\d+)\.")
_HF_EXPERT = re.compile(r"\.mlp\.experts\.(\d+)\.")


def is_expert_param(megatron_name: str) -> bool:
    """Parameters that differ between expert-parallel ranks (reduced over the expert data-parallel group)."""
    return _LOCAL_EXPERT.match(megatron_name) is not None


def sparse_layer_flags(
    num_hidden_layers: int, num_experts: int, mlp_only_layers: list[int], decoder_sparse_step: int
) -> list[bool]:
    """HF Qwen3MoeDecoderLayer's rule, per layer: experts unless in `mlp_only_layers`, and only every
    `decoder_sparse_step`-th layer ((i + 1) % step == 0). The trainer, the embedded engine and the routing
    replay all read it from here."""
    return [
        i not in mlp_only_layers and num_experts > 0 and (i + 1) % decoder_sparse_step == 0
        for i in range(num_hidden_layers)
    ]


@register_bridge("qwen3_moe")
class Qwen3MoeBridge(Qwen3Bridge):
    has_experts = True

    def _validate(self) -> None:
        cfg = self.hf_config
        if cfg.num_experts % self.ep_size:
            raise ValueError(
                f"expert_model_parallel_size={self.ep_size} must divide num_experts={cfg.num_experts} of qwen3_moe config"
            )
        if cfg.moe_intermediate_size % self.tp_size:
            raise ValueError(
                f"tensor_parallel_size={self.tp_size} must divide moe_intermediate_size={cfg.moe_intermediate_size} "
                "of qwen3_moe config"
            )
        if not 0 < cfg.num_experts_per_tok <= cfg.num_experts:
            raise UnsupportedModel(
                f"qwen3_moe config: num_experts_per_tok={cfg.num_experts_per_tok} must lie in [1, {cfg.num_experts}]"
            )
        super()._validate()

    # ---- structure ----------------------------------------------------------------------------
    @property
    def local_experts(self) -> int:
        return self.hf_config.num_experts // self.ep_size

    def sparse_layers(self) -> list[bool]:
        """HF Qwen3MoeDecoderLayer's rule: which layers have experts."""
        cfg = self.hf_config
        return sparse_layer_flags(cfg.num_hidden_layers, cfg.num_experts, cfg.mlp_only_layers, cfg.decoder_sparse_step)

    def transformer_config(self, **overrides):
        cfg = self.hf_config
        moe = dict(
            num_moe_experts=cfg.num_experts,
            moe_ffn_hidden_size=cfg.moe_intermediate_size,
            moe_router_topk=cfg.num_experts_per_tok,
            moe_router_score_function="softmax",
            moe_router_pre_softmax=not cfg.norm_topk_prob,
            moe_router_load_balancing_type="none",  # HF's aux loss is a training-time term; flags turn it on
            moe_aux_loss_coeff=0.0,
            moe_router_dtype="fp32",
            moe_token_dispatcher_type="alltoall",
            moe_grouped_gemm=False,
            moe_layer_freq=[int(s) for s in self.sparse_layers()],
            expert_model_parallel_size=self.ep_size,
        )
        moe.update(overrides)
        return super().transformer_config(**moe)

    def block_spec(self):
        from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

        from slime.models.rms_norm import RMSNorm

        dense, sparse = self.layer_spec(), self.layer_spec(self.hf_config.num_experts)
        layers = [sparse if is_sparse else dense for is_sparse in self.sparse_layers()]
        return TransformerBlockSubmodules(layer_specs=layers, layer_norm=RMSNorm)

    # ---- the name map -------------------------------------------------------------------------
    def param_maps(self) -> list[ParamMap]:
        sparse = self.sparse_layers()
        dense_mlp = re.compile(r"^decoder\.layers\.(\d+)\.mlp\.linear_fc[12]\.weight$")
        maps = []
        for pm in super().param_maps():
            match = dense_mlp.match(pm.megatron_name)
            if match is None or not sparse[int(match.group(1))]:
                maps.append(pm)
        for i, is_sparse in enumerate(sparse):
            if is_sparse:
                maps += self._moe_maps(i)
        return maps

    def _moe_maps(self, layer: int) -> list[ParamMap]:
        hf, mg = f"model.layers.{layer}.mlp.", f"decoder.layers.{layer}.mlp."
        maps = [ParamMap(mg + "router.weight", (hf + "gate.weight",), REPLICATED)]
        for local in range(self.local_experts):
            expert = f"{hf}experts.{self.ep_rank * self.local_experts + local}."
            mine = f"{mg}experts.local_experts.{local}."
            maps += [
                ParamMap(mine + "linear_fc1.weight", (expert + "gate_proj.weight", expert + "up_proj.weight"), GATE_UP),
                ParamMap(mine + "linear_fc2.weight", (expert + "down_proj.weight",), COLUMNS),
            ]
        return maps

    def hf_shapes(self) -> dict[str, tuple[int, ...]]:
        cfg = self.hf_config
        h, ffn = cfg.hidden_size, cfg.moe_intermediate_size
        shapes = super().hf_shapes()
        for i, is_sparse in enumerate(self.sparse_layers()):
            if not is_sparse:
                continue
            p = f"model.layers.{i}.mlp."
            for proj in ("gate_proj", "up_proj", "down_proj"):
                del shapes[f"{p}{proj}.weight"]
            shapes[p + "gate.weight"] = (cfg.num_experts, h)
            for e in range(cfg.num_experts):
                shapes.update(
                    {
                        f"{p}experts.{e}.gate_proj.weight": (ffn, h),
                        f"{p}experts.{e}.up_proj.weight": (ffn, h),
                        f"{p}experts.{e}.down_proj.weight": (h, ffn),
                    }
                )
        return shapes

    # ---- export -------------------------------------------------------------------------------
    def export_hf(
        self,
        model: torch.nn.Module,
        gather: Callable[[torch.Tensor], list[torch.Tensor]],
        gather_experts: Callable[[torch.Tensor], list[torch.Tensor]] | None = None,
        params: dict[str, torch.Tensor] | None = None,
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """As the dense export; each local expert's tensors are also gathered from every expert-parallel rank
        (rank r's local expert j is global expert r * local_experts + j)."""
        if self.ep_size > 1 and gather_experts is None:
            raise ValueError("export_hf: expert_model_parallel_size > 1 needs gather_experts")
        params = dict(model.named_parameters()) if params is None else params
        for pm in self.param_maps():
            named = self.to_hf(pm, self._tp_shards(pm, params, gather))
            local = _LOCAL_EXPERT.match(pm.megatron_name)
            if local is None or self.ep_size == 1:
                yield from named
                continue
            for hf_name, tensor in named:
                for rank, part in enumerate(gather_experts(tensor)):
                    expert = rank * self.local_experts + int(local.group(2))
                    yield _HF_EXPERT.sub(f".mlp.experts.{expert}.", hf_name), part
