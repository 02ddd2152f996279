"""What the trainer does differently for mixture-of-experts models with expert parallelism (EP > 1).

Expert-parallel ranks are data-parallel ranks that hold different experts, so:
  * gradients of expert parameters are summed over the expert data-parallel group (the ranks holding the same
    experts), the rest over the whole data-parallel group;
  * the gradient norm counts every expert once and every replicated parameter once, over all ranks, so that
    all ranks clip by the same factor (megatron does this with a second optimizer for the expert parameters);
  * the token all-to-all is a collective inside every MoE layer's forward and backward, so all ranks run the
    same number of micro-batches: a rank with fewer runs padding passes whose results are dropped.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from megatron.core import parallel_state
from megatron.core.optimizer.optimizer import FP32Optimizer

from slime.models.moe import is_expert_param


class ExpertParallelFP32Optimizer(FP32Optimizer):
    """megatron's FP32Optimizer whose grad norm is taken over every rank, each gradient counted once."""

    def __init__(self, optimizer, config, expert_params: set[int], is_first_dp_rank: bool, is_first_expert_dp: bool):
        super().__init__(optimizer, config, init_state_fn=None)
        self._expert_params = expert_params
        self._count_replicated = is_first_dp_rank
        self._count_experts = is_first_expert_dp
        self.grad_stats_parallel_group = torch.distributed.group.WORLD

    def get_main_grads_for_grad_norm(self) -> list[torch.Tensor]:
        grads = super().get_main_grads_for_grad_norm()  # drops tensor-parallel duplicates
        by_id = {id(p.grad): p for p in self.get_parameters() if p.grad is not None}
        kept = []
        for grad in grads:
            is_expert = id(by_id[id(grad)]) in self._expert_params
            if self._count_experts if is_expert else self._count_replicated:
                kept.append(grad)
        return kept


def expert_param_ids(model: torch.nn.Module) -> set[int]:
    return {id(p) for name, p in model.named_parameters() if is_expert_param(name)}


def sum_grads(params: list[torch.nn.Parameter], group) -> None:
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    if not params or torch.distributed.get_world_size(group) == 1:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    flat = _flatten_dense_tensors(grads)
    torch.distributed.all_reduce(flat, group=group)
    for grad, reduced in zip(grads, _unflatten_dense_tensors(flat, grads)):
        grad.copy_(reduced)


def reduce_expert_parallel_grads(model: torch.nn.Module, dp_group) -> None:
    experts = expert_param_ids(model)
    params = [p for p in model.parameters() if p.requires_grad]
    sum_grads([p for p in params if id(p) not in experts], dp_group)
    sum_grads([p for p in params if id(p) in experts], parallel_state.get_expert_data_parallel_group())


def equal_micro_batches(model: torch.nn.Module, groups: list[list[int]], device) -> Iterator[list[int]]:
    """Yield this rank's micro-batches, then run padding passes (a one-token forward, and a zero backward when
    gradients are on) until every rank has done as many micro-batches as the busiest one."""
    count = torch.tensor([len(groups)], dtype=torch.int64)
    torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MAX)
    yield from groups
    token = torch.zeros(1, 1, dtype=torch.long, device=device)
    for _ in range(int(count[0]) - len(groups)):
        out = model(token, token, None)
        if torch.is_grad_enabled() and out.requires_grad:
            (out.sum() * 0.0).backward()
