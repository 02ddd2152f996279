"""DeepEP token dispatch/combine behind slime's TokenDispatcher interface (NVIDIA GPUs with deep_ep installed).

Uses megatron-core's DeepEP wrappers (fused_dispatch / fused_combine, differentiable), so the buffers are the
ones megatron's flex dispatcher uses. DeepEP sends each token once per destination rank; the received
topk indices are local expert ids, -1 where a choice belongs to another rank. Rows are expanded to one per
(token, local choice), grouped by local expert, and folded back with the router weights before combine —
the same contract as slime.kernels.moe_dispatch.AllToAllTokenDispatcher.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from slime.kernels.checks import KernelInputError
from slime.kernels.moe_dispatch import Dispatched, check_routing


class DeepEPTokenDispatcher:
    def __init__(self, num_experts: int, group: dist.ProcessGroup):
        from megatron.core.transformer.moe.fused_a2a import fused_combine, fused_dispatch

        if fused_dispatch is None:
            raise ImportError("the DeepEP dispatcher needs deep_ep (not on PyPI: it ships in the slime CUDA image)")
        self._fused_dispatch, self._fused_combine = fused_dispatch, fused_combine
        world = dist.get_world_size(group)
        if num_experts % world:
            raise KernelInputError(
                f"moe dispatch: num_experts ({num_experts}) must divide evenly over the expert-parallel group "
                f"({world} ranks)"
            )
        self.group = group
        self.num_experts = num_experts
        self.local_experts = num_experts // world
        self._state = None

    def dispatch(self, hidden: torch.Tensor, topk_indices: torch.Tensor, topk_weights: torch.Tensor) -> Dispatched:
        check_routing("moe dispatch (deepep)", hidden, topk_indices, topk_weights, self.num_experts)
        # DeepEP takes int64 indices and fp32 weights only
        recv_x, recv_indices, recv_weights, _, handle = self._fused_dispatch(
            hidden, topk_indices.long(), topk_weights.float(), self.num_experts, self.group
        )
        top_k = recv_indices.shape[1]
        flat = recv_indices.reshape(-1)
        valid = flat >= 0
        # choices for other ranks sort after every local expert and are cut off
        order = torch.sort(torch.where(valid, flat, self.local_experts), stable=True).indices[: int(valid.sum())]
        rows = order // top_k
        counts = torch.bincount(flat[valid], minlength=self.local_experts)
        self._state = (handle, rows, recv_weights.reshape(-1).index_select(0, order), recv_x.shape[0])
        return Dispatched(recv_x.index_select(0, rows), counts.cpu())

    def combine(self, expert_outputs: torch.Tensor) -> torch.Tensor:
        if self._state is None:
            raise RuntimeError("moe combine called before dispatch")
        handle, rows, weights, received = self._state
        if expert_outputs.dim() != 2 or expert_outputs.shape[0] != rows.shape[0]:
            raise KernelInputError(
                f"moe combine: expert_outputs must be [M, H] with M = {rows.shape[0]} dispatched rows, "
                f"got {tuple(expert_outputs.shape)}"
            )
        weighted = expert_outputs * weights.unsqueeze(1).to(expert_outputs.dtype)
        per_token = torch.zeros(
            received, expert_outputs.shape[1], dtype=expert_outputs.dtype, device=expert_outputs.device
        )
        per_token = per_token.index_add(0, rows, weighted)
        combined, _ = self._fused_combine(per_token, self.group, handle)
        self._state = None
        return combined
