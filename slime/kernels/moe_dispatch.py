"""MoE token dispatch / combine over the expert-parallel group: the interface and the all-to-all reference.

Experts are split evenly over the group: rank r owns experts [r * E_local, (r + 1) * E_local). A router gives
each of the T local tokens K expert choices with weights. `dispatch` sends every (token, choice) row to the rank
owning that expert and returns the rows this rank must run, grouped by local expert; `combine` sends the expert
outputs back and returns, per original token, sum_k weight_k * expert_{choice_k}(token). Both are differentiable.

The all-to-all implementation here runs on any torch.distributed backend (gloo included). The DeepEP adapter
behind the same interface lives with the GPU backend; slime.backends.moe_dispatch chooses between them and gives
the matching megatron-core setting (moe_token_dispatcher_type).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn

from slime.kernels.checks import KernelInputError


@dataclass(frozen=True)
class Dispatched:
    expert_inputs: torch.Tensor  # [M, H] rows for this rank's experts, expert-major
    tokens_per_expert: torch.Tensor  # [E_local] int64 on the host: row counts of expert_inputs per local expert


class TokenDispatcher(Protocol):
    num_experts: int
    local_experts: int

    def dispatch(self, hidden: torch.Tensor, topk_indices: torch.Tensor, topk_weights: torch.Tensor) -> Dispatched: ...

    def combine(self, expert_outputs: torch.Tensor) -> torch.Tensor: ...


def check_routing(op: str, hidden: torch.Tensor, topk_indices: torch.Tensor, topk_weights: torch.Tensor, experts: int):
    if hidden.dim() != 2:
        raise KernelInputError(f"{op}: hidden must be 2-D [T, H], got shape {tuple(hidden.shape)}")
    if topk_indices.dim() != 2 or topk_indices.shape[0] != hidden.shape[0] or topk_weights.shape != topk_indices.shape:
        raise KernelInputError(
            f"{op}: topk_indices and topk_weights must both be [T, K] with T = hidden.shape[0]; got hidden "
            f"{tuple(hidden.shape)} topk_indices {tuple(topk_indices.shape)} topk_weights {tuple(topk_weights.shape)}"
        )
    if topk_indices.dtype not in (torch.int64, torch.int32):
        raise KernelInputError(f"{op}: topk_indices dtype must be int64 or int32, got {topk_indices.dtype}")
    if topk_indices.device != hidden.device or topk_weights.device != hidden.device:
        raise KernelInputError(
            f"{op}: hidden on {hidden.device}, topk_indices on {topk_indices.device}, topk_weights on "
            f"{topk_weights.device}; all must share a device"
        )
    if topk_indices.numel() and (int(topk_indices.min()) < 0 or int(topk_indices.max()) >= experts):
        raise KernelInputError(
            f"{op}: expert ids must lie in [0, {experts}), got min {int(topk_indices.min())} "
            f"max {int(topk_indices.max())}"
        )


class AllToAllTokenDispatcher:
    """Dispatch/combine with two all-to-alls (counts, then rows) each way."""

    def __init__(self, num_experts: int, group: dist.ProcessGroup | None = None):
        self.group = group
        self.world = dist.get_world_size(group) if dist.is_initialized() else 1
        if num_experts % self.world:
            raise KernelInputError(
                f"moe dispatch: num_experts ({num_experts}) must divide evenly over the expert-parallel group "
                f"({self.world} ranks)"
            )
        self.num_experts = num_experts
        self.local_experts = num_experts // self.world
        self._state: _RouteState | None = None

    def dispatch(self, hidden: torch.Tensor, topk_indices: torch.Tensor, topk_weights: torch.Tensor) -> Dispatched:
        check_routing("moe dispatch", hidden, topk_indices, topk_weights, self.num_experts)
        tokens, top_k = topk_indices.shape
        flat_experts = topk_indices.reshape(-1).long()
        # stable sort keeps, within one expert, the order of (token, choice): deterministic layouts
        order = torch.sort(flat_experts, stable=True).indices
        source_token = order // top_k
        send_rows = hidden.index_select(0, source_token)
        send_counts = torch.bincount(flat_experts, minlength=self.num_experts)  # per global expert

        # recv_counts[s, e]: rows rank s sends to this rank's local expert e
        recv_counts = self._exchange_counts(send_counts)
        send_split = send_counts.view(self.world, self.local_experts).sum(1).tolist()
        recv_split = recv_counts.sum(1).tolist()
        received = self._all_to_all(send_rows, recv_split, send_split)

        # received rows are (source rank, local expert)-major; experts want (local expert, source rank)-major
        expert_major_order = _expert_major_order(recv_counts).to(hidden.device)
        source_major_order = torch.empty_like(expert_major_order)
        source_major_order[expert_major_order] = torch.arange(expert_major_order.numel(), device=hidden.device)
        self._state = _RouteState(
            tokens=tokens,
            source_token=source_token,
            sorted_weights=topk_weights.reshape(-1).index_select(0, order),
            send_split=send_split,
            recv_split=recv_split,
            expert_major_order=expert_major_order,
            source_major_order=source_major_order,
        )
        return Dispatched(received.index_select(0, expert_major_order), recv_counts.sum(0).cpu())

    def combine(self, expert_outputs: torch.Tensor) -> torch.Tensor:
        state = self._state
        if state is None:
            raise RuntimeError("moe combine called before dispatch")
        if expert_outputs.dim() != 2 or expert_outputs.shape[0] != state.expert_major_order.shape[0]:
            raise KernelInputError(
                f"moe combine: expert_outputs must be [M, H] with M = {state.expert_major_order.shape[0]} dispatched "
                f"rows, got {tuple(expert_outputs.shape)}"
            )
        source_major = expert_outputs.index_select(0, state.source_major_order)
        returned = self._all_to_all(source_major, state.send_split, state.recv_split)
        weighted = returned * state.sorted_weights.unsqueeze(1).to(returned.dtype)
        out = torch.zeros(
            state.tokens, expert_outputs.shape[1], dtype=expert_outputs.dtype, device=expert_outputs.device
        )
        self._state = None
        return out.index_add(0, state.source_token, weighted)

    def _exchange_counts(self, send_counts: torch.Tensor) -> torch.Tensor:
        if self.world == 1:
            return send_counts.view(1, self.local_experts)
        received = torch.empty_like(send_counts)
        dist.all_to_all_single(received, send_counts, group=self.group)
        return received.view(self.world, self.local_experts)

    def _all_to_all(self, rows: torch.Tensor, out_split: list[int], in_split: list[int]) -> torch.Tensor:
        if self.world == 1:
            return rows
        out = rows.new_empty((sum(out_split), rows.shape[1]))
        return dist_fn.all_to_all_single(
            out, rows.contiguous(), out_split, in_split, group=self.group or dist.group.WORLD
        )


@dataclass(frozen=True)
class _RouteState:
    tokens: int
    source_token: torch.Tensor  # [T*K] token of each sorted (token, choice) row
    sorted_weights: torch.Tensor  # [T*K] router weight of each sorted row
    send_split: list[int]
    recv_split: list[int]
    expert_major_order: torch.Tensor  # [M] received-row index of each expert-major row
    source_major_order: torch.Tensor  # [M] its inverse permutation


def _expert_major_order(recv_counts: torch.Tensor) -> torch.Tensor:
    """For rows laid out by (source rank, local expert) blocks of sizes recv_counts[s, e], the row indices in
    (local expert, source rank) order."""
    world, local_experts = recv_counts.shape
    flat = recv_counts.reshape(-1).tolist()
    starts = [0]
    for count in flat:
        starts.append(starts[-1] + count)
    pieces = [
        torch.arange(starts[s * local_experts + e], starts[s * local_experts + e + 1])
        for e in range(local_experts)
        for s in range(world)
    ]
    return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)
