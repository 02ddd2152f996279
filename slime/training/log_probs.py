"""Log-probabilities and entropy from vocab-sharded logits, without gathering the full vocabulary.

Each tensor-parallel rank holds logits for a contiguous slice of the vocabulary. The softmax normaliser,
the target's logit and sum(p * logit) are summed across ranks with an all-reduce whose backward is the
identity (megatron's reduce_from_tensor_model_parallel_region), which is exact because every TP rank
computes the same loss.
"""

from __future__ import annotations

import torch
from torch import Tensor


def vocab_parallel_log_probs_and_entropy(
    logits: Tensor, targets: Tensor, vocab_start: int, tp_group, with_entropy: bool = True
) -> tuple[Tensor, Tensor | None]:
    """logits [..., vocab_local] (this rank's slice starting at vocab_start), targets [...] global ids."""
    from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region

    tp_size = torch.distributed.get_world_size(tp_group) if tp_group is not None else 1
    logits = logits.float()
    if tp_size == 1:  # the whole vocabulary is here: one fused log_softmax
        log_softmax = torch.log_softmax(logits, dim=-1)
        log_probs = log_softmax.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        entropy = -(log_softmax.exp() * log_softmax).sum(dim=-1) if with_entropy else None
        return log_probs, entropy
    with torch.no_grad():
        max_logit = logits.max(dim=-1, keepdim=True).values
        if tp_size > 1:
            torch.distributed.all_reduce(max_logit, op=torch.distributed.ReduceOp.MAX, group=tp_group)
    shifted = logits - max_logit
    exp = shifted.exp()
    sum_exp = exp.sum(dim=-1)
    local_target = targets - vocab_start
    in_range = (local_target >= 0) & (local_target < logits.shape[-1])
    target_logit = shifted.gather(-1, local_target.clamp(0, logits.shape[-1] - 1).unsqueeze(-1)).squeeze(-1)
    target_logit = torch.where(in_range, target_logit, torch.zeros_like(target_logit))
    if tp_size > 1:
        sum_exp = reduce_from_tensor_model_parallel_region(sum_exp)
        target_logit = reduce_from_tensor_model_parallel_region(target_logit)
    log_z = sum_exp.log()
    log_probs = target_logit - log_z
    if not with_entropy:
        return log_probs, None
    # H = log Z - sum_v p_v * shifted_v
    expected_logit = (exp * shifted).sum(dim=-1)
    if tp_size > 1:
        expected_logit = reduce_from_tensor_model_parallel_region(expected_logit)
    entropy = log_z - expected_logit / sum_exp
    return log_probs, entropy
