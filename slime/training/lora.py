"""LoRA on the Megatron trainer: adapters on megatron's column- and row-parallel linears of every layer.

Each adapter is split the way its base weight is (slime.models.gpt_bridge's layout):
  * column-parallel (linear_qkv, linear_fc1): A [r, in] replicated, B split on the output dim. The low-rank
    activation x A^T goes through megatron's copy-to-TP region (identity forward, all-reduce backward), so A's
    gradient and the input's gradient through the adapter are the full sums on every rank.
  * row-parallel (linear_proj, linear_fc2): A split on the input dim, B replicated. x_local A_local^T is summed
    over the TP group (reduce-from-TP region: all-reduce forward, identity backward) before B.
Fused layouts keep HF's separate adapters: linear_qkv carries q_proj / k_proj / v_proj adapters whose outputs are
interleaved per KV group like its rows ([q_g, k_g, v_g]); linear_fc1 carries gate_proj and up_proj ([gate; up]).
Base weights are frozen (requires_grad False: no gradients, no optimizer state); merged weights W + s B A are
computed per rank from local shards (no communication) for weight sync and `--save-hf`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import nn

from slime.models.lora import A_SUFFIX, B_SUFFIX, LoraSpec, check_targets, initial_a, module_name

COLUMN, ROW = "column", "row"
# megatron linear (under decoder.layers.<i>.) -> (kind, fused layout, HF targets in output order)
LINEARS = {
    "self_attention.linear_qkv": (COLUMN, "qkv", ("q_proj", "k_proj", "v_proj")),
    "self_attention.linear_proj": (ROW, "one", ("o_proj",)),
    "mlp.linear_fc1": (COLUMN, "cat", ("gate_proj", "up_proj")),
    "mlp.linear_fc2": (ROW, "one", ("down_proj",)),
}


class LinearAdapters(nn.Module):
    """The adapters of one megatron linear (parameters A.<target>, B.<target> for its targeted HF modules)."""

    def __init__(self, kind: str, layout: str, pieces: list[tuple[str, int, bool]], local_in: int, ctx: dict):
        super().__init__()
        self.kind, self.layout, self.ctx = kind, layout, ctx
        self.pieces = pieces  # (target, local output rows, adapted?) in output order
        self.scaling = ctx["spec"].scaling
        self.dropout = nn.Dropout(ctx["spec"].dropout) if ctx["spec"].dropout > 0 else nn.Identity()
        rank = ctx["spec"].rank
        self.A, self.B = nn.ParameterDict(), nn.ParameterDict()
        for target, rows, adapted in pieces:
            if adapted:
                self.A[target] = nn.Parameter(torch.zeros(rank, local_in))
                self.B[target] = nn.Parameter(torch.zeros(rows, rank))

    @property
    def targets(self) -> list[str]:
        return [t for t, _, adapted in self.pieces if adapted]

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's share of the linear's output added by the adapters, [..., local out]: one matmul into the
        fused layout (fused_b), so no activation-sized piece is cut, zero-filled or interleaved."""
        from megatron.core.tensor_parallel.mappings import (
            copy_to_tensor_model_parallel_region,
            reduce_from_tensor_model_parallel_region,
        )

        group = self.ctx["tp_group"]
        a = torch.cat([self.A[t] for t in self.targets])
        low = self._dropped(x) @ a.to(x.dtype).t()  # [..., r * adapted pieces]
        if self.kind == COLUMN:
            low = copy_to_tensor_model_parallel_region(low, group=group)
        else:
            low = reduce_from_tensor_model_parallel_region(low, group=group)
        return low @ self.fused_b().to(x.dtype).t()

    def _dropped(self, x: torch.Tensor) -> torch.Tensor:
        """--lora-dropout on the adapter's input: a replicated input (column-parallel) draws the same mask on every
        TP rank from the shared generator; a split one (row-parallel) draws from megatron's per-rank stream, so
        the ranks' slices get independent masks, as one unsplit input would."""
        if self.kind == COLUMN or not (self.training and isinstance(self.dropout, nn.Dropout)):
            return self.dropout(x)
        from megatron.core.tensor_parallel import get_cuda_rng_tracker

        with get_cuda_rng_tracker().fork():
            return self.dropout(x)

    def fused_b(self) -> torch.Tensor:
        """s * B of every piece in the fused output layout, [local out, r * adapted pieces]: piece p's B in its own
        rows and its own r columns, zero elsewhere (a small weight-sized tensor, rebuilt per forward)."""
        rank, width = self.ctx["spec"].rank, self.ctx["spec"].rank * len(self.targets)
        parts, column = [], 0
        for target, rows, adapted in self.pieces:
            if adapted:
                b = self.B[target]
                parts.append(torch.nn.functional.pad(b, (column, width - column - rank)))
                column += rank
            else:
                parts.append(self.B[self.targets[0]].new_zeros(rows, width))
        return self.scaling * self.combine(parts, 0)

    def weight_delta(self) -> torch.Tensor:
        """s * B A on this rank's shard of the base weight, in its layout."""
        a = torch.cat([self.A[t].detach() for t in self.targets])
        return self.fused_b().detach() @ a

    def combine(self, parts: list[torch.Tensor], dim: int) -> torch.Tensor:
        """The pieces' rows in the fused linear's output layout along `dim` (qkv: interleaved per local KV group)."""
        if self.layout != "qkv":
            return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)
        groups = self.ctx["local_groups"]
        moved = [p.movedim(dim, -1) for p in parts]
        lead = moved[0].shape[:-1]
        grouped = torch.cat([m.reshape(*lead, groups, -1) for m in moved], dim=-1)
        return grouped.reshape(*lead, -1).movedim(-1, dim)

    def hook(self, _module, args, output):
        out, bias = output
        return out + self.delta(args[0]), bias


def attach(model: nn.Module, bridge, spec: LoraSpec, tp_group) -> dict[str, LinearAdapters]:
    """Freeze every base parameter and hang adapters (B = 0, A as PEFT initialises it) on the targeted linears;
    returns {megatron linear name: its adapters}."""
    check_targets(spec, bridge.hf_config.to_dict())
    for param in model.parameters():
        param.requires_grad_(False)
    ctx = {"spec": spec, "tp_group": tp_group, "local_groups": bridge.num_kv_heads // bridge.tp_size}
    adapters = {}
    modules = dict(model.named_modules())
    for layer in range(bridge.hf_config.num_hidden_layers):
        for suffix, (kind, layout, targets) in LINEARS.items():
            if not any(t in spec.targets for t in targets):
                continue
            name = f"decoder.layers.{layer}.{suffix}"
            adapters[name] = _adapt(modules[name], kind, layout, targets, spec, ctx)
    _initialise(adapters, bridge, spec)
    return adapters


def _adapt(linear: nn.Module, kind: str, layout: str, targets: tuple, spec: LoraSpec, ctx: dict) -> LinearAdapters:
    from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

    out_local, in_local = linear.weight.shape
    if layout == "qkv":
        groups, d = ctx["local_groups"], linear.config.kv_channels
        q_rows = out_local - 2 * groups * d
        rows = [q_rows, groups * d, groups * d]
    else:
        rows = [out_local // len(targets)] * len(targets)
    pieces = [(t, r, t in spec.targets) for t, r in zip(targets, rows)]
    adapters = LinearAdapters(kind, layout, pieces, in_local, ctx).to(linear.weight.device)
    linear.lora = adapters
    linear.register_forward_hook(adapters.hook)
    split = adapters.B if kind == COLUMN else adapters.A  # the factor split like the base weight
    for param in split.values():
        set_tensor_model_parallel_attributes(param, True, 0 if kind == COLUMN else 1, 1)
    return adapters


def _initialise(adapters: dict[str, LinearAdapters], bridge, spec: LoraSpec) -> None:
    """A from the full-shape draw (then this rank's slice), B zero: the model starts equal to the base model."""
    with torch.no_grad():
        for name, lin in adapters.items():
            for target, module in _hf_modules(name, lin):
                local = lin.A[target]
                full_in = local.shape[1] * (bridge.tp_size if lin.kind == ROW else 1)
                a = initial_a(module, (spec.rank, full_in), spec.seed)
                local.copy_(a if lin.kind == COLUMN else a.chunk(bridge.tp_size, 1)[bridge.tp_rank])


def _hf_modules(name: str, lin: LinearAdapters) -> Iterator[tuple[str, str]]:
    layer = int(name.split(".")[2])
    for target in lin.targets:
        yield target, module_name(layer, target)


def export_adapters(
    adapters: dict[str, LinearAdapters], gather: Callable[[torch.Tensor], list[torch.Tensor]], tp_size: int
) -> Iterator[tuple[str, torch.Tensor]]:
    """Full PEFT-named A and B of every adapter (a collective over TP: every rank iterates to the end)."""
    for name, lin in adapters.items():
        for target, module in _hf_modules(name, lin):
            a, b = lin.A[target].detach(), lin.B[target].detach()
            if tp_size > 1 and lin.kind == COLUMN:
                b = torch.cat(gather(b), dim=0)
            elif tp_size > 1:
                a = torch.cat(gather(a), dim=1)
            yield module + A_SUFFIX, a
            yield module + B_SUFFIX, b


def load_adapters(adapters: dict[str, LinearAdapters], hf: dict[str, torch.Tensor], tp_size: int, tp_rank: int):
    """Set every adapter from full PEFT-named tensors (e.g. `slime.models.lora.read_peft`), this rank's slices."""
    with torch.no_grad():
        for name, lin in adapters.items():
            for target, module in _hf_modules(name, lin):
                a, b = hf[module + A_SUFFIX].float(), hf[module + B_SUFFIX].float()
                if lin.kind == COLUMN:
                    b = b.chunk(tp_size, 0)[tp_rank]
                else:
                    a = a.chunk(tp_size, 1)[tp_rank]
                lin.A[target].copy_(a)
                lin.B[target].copy_(b)


def merged_params(model: nn.Module, adapters: dict[str, LinearAdapters]) -> dict[str, torch.Tensor]:
    """Every parameter by megatron name, the adapted linears' weights as W + s B A (this rank's shards)."""
    params = {n: p.detach() for n, p in model.named_parameters() if ".lora." not in n}
    for name, lin in adapters.items():
        weight = params[name + ".weight"]
        params[name + ".weight"] = weight + lin.weight_delta().to(weight.dtype)
    return params
