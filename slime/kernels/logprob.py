"""Log-probs of given tokens and the entropy of the sampling distribution, chunked over the vocabulary.

For logits z = logits / temperature (computed in fp32):
    lse        = log sum_j exp(z_j)
    log_prob   = z[token] - lse
    entropy    = lse - sum_j p_j z_j          (p = softmax(z))
One pass over V keeps, per row, a running max m, s = sum exp(z - m) and w = sum exp(z - m) (z - m) (an online
log-sum-exp), so the forward never holds more than one [N, chunk] fp32 block, never an N x V log-softmax.
The backward recomputes p per chunk from the saved lse:
    d log_prob / dz_j = [j == token] - p_j          d entropy / dz_j = -p_j (log p_j + entropy)

Three forms share that math:
  * `logprobs_and_entropy(logits[N, V], tokens[N])`
  * `vocab_parallel_logprobs_and_entropy(logits[N, V/TP], tokens[N], group)`: each rank holds a contiguous
    vocabulary slice (Megatron's split); the per-rank (m, s, w, token logit) are combined with one MAX and
    one SUM all-reduce; the backward needs no communication.
  * `linear_logprobs_and_entropy(hidden[N, H], weight[V, H], tokens[N])`: logits are produced chunk by chunk
    from the output-layer weight and never exist whole (with `group`, weight is the rank's vocabulary slice and
    the hidden-state gradient is summed over the group).
Outputs are fp32 whatever the input dtype; gradients come back in the input dtype.

An implementation supplies two passes over a local [N, V_local] logits block (`VocabPasses`); the torch passes
here are the reference every other implementation is tested against.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from slime.kernels.checks import (
    check_linear,
    check_logits_and_tokens,
    check_temperature_and_chunk,
    check_token_range,
)

DEFAULT_CHUNK_SIZE = 4096
# -inf logits (masked vocabulary entries) are clamped to the lowest finite fp32 so exp() gives 0 and
# 0 * z stays 0 instead of NaN.
FP32_LOWEST = torch.finfo(torch.float32).min
LOG_P_FLOOR = -1.0e4  # exp() of anything below is exactly 0 in fp32

# stats(logits, local_tokens, inv_temp, chunk_size) -> (m, s, w, token_z), each fp32 [N]
StatsPass = Callable[[torch.Tensor, torch.Tensor, float, int], tuple[torch.Tensor, ...]]
# grad(logits, local_tokens, lse, entropy, grad_log_probs, grad_entropy, inv_temp, chunk_size) -> grad_logits
GradPass = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class VocabPasses:
    """The two passes over a local logits block that an implementation provides."""

    name: str
    stats: StatsPass
    grad: GradPass


# ---- the torch passes (reference) ----------------------------------------------------------------------------


class _Scratch:
    """Two reusable fp32 [N, chunk] buffers: fresh allocations per chunk cost page faults and allocator traffic."""

    def __init__(self, rows: int, chunk_size: int, width: int, device: torch.device):
        size = rows * min(chunk_size, max(width, 1))
        self.rows = rows
        self.first = torch.empty(size, dtype=torch.float32, device=device)
        self.second = torch.empty(size, dtype=torch.float32, device=device)

    def views(self, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        count = self.rows * width
        return self.first[:count].view(self.rows, width), self.second[:count].view(self.rows, width)


def _scaled_fp32(raw_chunk: torch.Tensor, inv_temp: float, out: torch.Tensor, clamp: bool = True) -> torch.Tensor:
    """out = max(raw * inv_temp, lowest) in fp32 (no max when clamp=False); out is scratch, never a view of the
    caller's logits, since it is edited in place afterwards."""
    if raw_chunk.dtype == torch.float32:
        torch.mul(raw_chunk, inv_temp, out=out)
    else:
        # torch.mul(bf16, scalar, out=fp32) would multiply in bf16 and round: upcast first
        out.copy_(raw_chunk)
        if inv_temp != 1.0:
            out.mul_(inv_temp)
    return out.clamp_(min=FP32_LOWEST) if clamp else out


class _OnlineStats:
    """Running per-row (m, s, w, token_z) over vocabulary chunks; w is kept relative to m for precision."""

    def __init__(self, rows: int, device: torch.device):
        # starting at the lowest finite value (not -inf) keeps every rescale product finite: s = 0 at the start
        self.m = torch.full((rows,), FP32_LOWEST, dtype=torch.float32, device=device)
        self.s = torch.zeros(rows, dtype=torch.float32, device=device)
        self.w = torch.zeros(rows, dtype=torch.float32, device=device)
        self.token_z = torch.zeros(rows, dtype=torch.float32, device=device)

    def add(self, z: torch.Tensor, e: torch.Tensor, start: int, local_tokens: torch.Tensor) -> None:
        """Fold in z = scaled fp32 logits of columns [start, start + C); z is consumed and e (same shape) is
        scratch."""
        width = z.shape[1]
        index = local_tokens - start
        in_chunk = (index >= 0) & (index < width)
        picked = z.gather(1, index.clamp(0, width - 1).unsqueeze(1)).squeeze(1)
        self.token_z += torch.where(in_chunk, picked, 0.0)

        m_new = torch.maximum(self.m, z.amax(dim=1))
        rescale = torch.exp(self.m - m_new)
        # moving the reference point from m to m_new shifts every (z - m) by (m - m_new)
        shift = self.s * (self.m - m_new)
        shifted = z.sub_(m_new.unsqueeze(1))
        torch.exp(shifted, out=e)
        self.s = self.s * rescale + e.sum(dim=1)
        # in place: a fresh [N, C] product (or einsum/bmm) measured 4x slower than mul_ + sum on CPU
        self.w = (self.w + shift) * rescale + shifted.mul_(e).sum(dim=1)
        self.m = m_new

    def result(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.m, self.s, self.w, self.token_z


def _chunk_grad(
    z: torch.Tensor,
    p: torch.Tensor,
    start: int,
    local_tokens: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor,
    grad_log_probs: torch.Tensor,
    grad_entropy: torch.Tensor,
    inv_temp: float,
    out: torch.Tensor,
) -> torch.Tensor:
    """out = d(loss)/d(raw logits) for one chunk. z holds the scaled fp32 logits and is consumed; p is scratch."""
    width = z.shape[1]
    # any log p below the floor has p = exp(log p) = 0 exactly, so flooring changes nothing but keeps masked
    # (-inf) entries finite through the products below
    log_p = z.sub_(lse.unsqueeze(1)).clamp_(min=LOG_P_FLOOR)
    torch.exp(log_p, out=p)
    # d/dz = -p (g_ent (log p + H) + g_lp) + g_lp [token]; the 1/T of z = logits / T comes last
    t = log_p.add_(entropy.unsqueeze(1)).mul_(grad_entropy.unsqueeze(1)).add_(grad_log_probs.unsqueeze(1)).mul_(p)
    index = local_tokens - start
    in_chunk = (index >= 0) & (index < width)
    onehot = torch.where(in_chunk, -grad_log_probs, 0.0)
    t.scatter_add_(1, index.clamp(0, width - 1).unsqueeze(1), onehot.unsqueeze(1))
    return torch.mul(t, -inv_temp, out=out)


def torch_stats(logits: torch.Tensor, local_tokens: torch.Tensor, inv_temp: float, chunk_size: int):
    rows, vocab = logits.shape
    stats = _OnlineStats(rows, logits.device)
    scratch = _Scratch(rows, chunk_size, vocab, logits.device)
    for start in range(0, vocab, chunk_size):
        raw = logits[:, start : start + chunk_size]
        z, e = scratch.views(raw.shape[1])
        stats.add(_scaled_fp32(raw, inv_temp, z), e, start, local_tokens)
    return stats.result()


def torch_grad(
    logits: torch.Tensor,
    local_tokens: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor,
    grad_log_probs: torch.Tensor,
    grad_entropy: torch.Tensor,
    inv_temp: float,
    chunk_size: int,
) -> torch.Tensor:
    rows, vocab = logits.shape
    grad = torch.empty_like(logits)
    scratch = _Scratch(rows, chunk_size, vocab, logits.device)
    for start in range(0, vocab, chunk_size):
        raw = logits[:, start : start + chunk_size]
        z, p = scratch.views(raw.shape[1])
        _scaled_fp32(raw, inv_temp, z, clamp=False)
        _chunk_grad(
            z,
            p,
            start,
            local_tokens,
            lse,
            entropy,
            grad_log_probs,
            grad_entropy,
            inv_temp,
            out=grad[:, start : start + chunk_size],
        )
    return grad


TORCH_PASSES = VocabPasses(name="torch", stats=torch_stats, grad=torch_grad)


# ---- combining statistics (shared by all implementations) ---------------------------------------------------


def combine_stats(m, s, w, token_z, group: dist.ProcessGroup | None):
    """(log_probs, entropy, lse) from per-row statistics, all-reduced over `group` when given."""
    if group is not None:
        m_global = m.clone()
        dist.all_reduce(m_global, op=dist.ReduceOp.MAX, group=group)
        rescale = torch.exp(m - m_global)
        packed = torch.stack([s * rescale, (w + s * (m - m_global)) * rescale, token_z])
        dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
        s, w, token_z = packed.unbind(0)
        m = m_global
    log_s = torch.log(s)
    lse = m + log_s
    entropy = log_s - w / s
    return token_z - lse, entropy, lse


# ---- autograd functions -------------------------------------------------------------------------------------


class _LogprobEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, tokens, passes: VocabPasses, inv_temp: float, chunk_size: int, group, vocab_start: int):
        local_tokens = tokens.long() - vocab_start
        m, s, w, token_z = passes.stats(logits, local_tokens, inv_temp, chunk_size)
        log_probs, entropy, lse = combine_stats(m, s, w, token_z, group)
        ctx.save_for_backward(logits, local_tokens, lse, entropy)
        ctx.passes, ctx.inv_temp, ctx.chunk_size = passes, inv_temp, chunk_size
        return log_probs, entropy

    @staticmethod
    def backward(ctx, grad_log_probs, grad_entropy):
        logits, local_tokens, lse, entropy = ctx.saved_tensors
        grad_log_probs = _grad_or_zeros(grad_log_probs, lse)
        grad_entropy = _grad_or_zeros(grad_entropy, lse)
        grad = ctx.passes.grad(
            logits, local_tokens, lse, entropy, grad_log_probs, grad_entropy, ctx.inv_temp, ctx.chunk_size
        )
        return grad, None, None, None, None, None, None


class _LinearLogprobEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, tokens, inv_temp: float, chunk_size: int, group, vocab_start: int):
        local_tokens = tokens.long() - vocab_start
        stats = _OnlineStats(hidden.shape[0], hidden.device)
        scratch = _Scratch(hidden.shape[0], chunk_size, weight.shape[0], hidden.device)
        for start in range(0, weight.shape[0], chunk_size):
            raw = hidden @ weight[start : start + chunk_size].t()
            z, e = scratch.views(raw.shape[1])
            stats.add(_scaled_fp32(raw, inv_temp, z), e, start, local_tokens)
        log_probs, entropy, lse = combine_stats(*stats.result(), group)
        ctx.save_for_backward(hidden, weight, local_tokens, lse, entropy)
        ctx.inv_temp, ctx.chunk_size, ctx.group = inv_temp, chunk_size, group
        return log_probs, entropy

    @staticmethod
    def backward(ctx, grad_log_probs, grad_entropy):
        hidden, weight, local_tokens, lse, entropy = ctx.saved_tensors
        grad_log_probs = _grad_or_zeros(grad_log_probs, lse)
        grad_entropy = _grad_or_zeros(grad_entropy, lse)
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if need_hidden else None
        grad_weight = torch.empty_like(weight) if need_weight else None
        scratch = _Scratch(hidden.shape[0], ctx.chunk_size, weight.shape[0], hidden.device)
        for start in range(0, weight.shape[0], ctx.chunk_size):
            weight_chunk = weight[start : start + ctx.chunk_size]
            z, p = scratch.views(weight_chunk.shape[0])
            _scaled_fp32(hidden @ weight_chunk.t(), ctx.inv_temp, z, clamp=False)
            d_logits = torch.empty(z.shape, dtype=hidden.dtype, device=hidden.device)
            _chunk_grad(
                z, p, start, local_tokens, lse, entropy, grad_log_probs, grad_entropy, ctx.inv_temp, out=d_logits
            )
            if need_hidden:
                grad_hidden += d_logits @ weight_chunk
            if need_weight:
                grad_weight[start : start + ctx.chunk_size] = d_logits.t() @ hidden
        if need_hidden:
            if ctx.group is not None:
                # every rank saw the same hidden states but only its vocabulary slice
                dist.all_reduce(grad_hidden, op=dist.ReduceOp.SUM, group=ctx.group)
            grad_hidden = grad_hidden.to(hidden.dtype)
        return grad_hidden, grad_weight, None, None, None, None, None


def _grad_or_zeros(grad: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(like) if grad is None else grad.float().contiguous()


# ---- public entry points (shared by implementations through `passes`) ---------------------------------------


def logprobs_and_entropy_with(
    passes: VocabPasses,
    logits: torch.Tensor,
    tokens: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[torch.Tensor, torch.Tensor]:
    op = "logprobs_and_entropy"
    check_logits_and_tokens(op, logits, tokens)
    check_temperature_and_chunk(op, temperature, chunk_size)
    check_token_range(op, tokens, logits.shape[1])
    return _LogprobEntropy.apply(logits, tokens, passes, 1.0 / temperature, chunk_size, None, 0)


def vocab_parallel_logprobs_and_entropy_with(
    passes: VocabPasses,
    logits: torch.Tensor,
    tokens: torch.Tensor,
    group: dist.ProcessGroup | None,
    temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[torch.Tensor, torch.Tensor]:
    op = "vocab_parallel_logprobs_and_entropy"
    check_logits_and_tokens(op, logits, tokens, logits_name="logits (local vocabulary slice)")
    check_temperature_and_chunk(op, temperature, chunk_size)
    rank, world = _rank_and_world(group)
    check_token_range(op, tokens, logits.shape[1] * world)
    return _LogprobEntropy.apply(
        logits, tokens, passes, 1.0 / temperature, chunk_size, group if world > 1 else None, rank * logits.shape[1]
    )


def _rank_and_world(group: dist.ProcessGroup | None) -> tuple[int, int]:
    if group is None or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


# ---- the torch reference ------------------------------------------------------------------------------------


def logprobs_and_entropy(
    logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log_probs[N], entropy[N]) in fp32 of `tokens` under softmax(logits / temperature); differentiable."""
    return logprobs_and_entropy_with(TORCH_PASSES, logits, tokens, temperature, chunk_size)


def vocab_parallel_logprobs_and_entropy(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    group: dist.ProcessGroup | None,
    temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """As `logprobs_and_entropy`, with logits[N, V / world] holding this rank's contiguous vocabulary slice
    (rank r holds columns [r * V_local, (r + 1) * V_local)); tokens are full-vocabulary ids, the same on every
    rank. Outputs are identical on every rank; each rank gets the gradient of its own slice."""
    return vocab_parallel_logprobs_and_entropy_with(TORCH_PASSES, logits, tokens, group, temperature, chunk_size)


def linear_logprobs_and_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    tokens: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    group: dist.ProcessGroup | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log_probs, entropy) of logits = hidden @ weight.T without materializing them. With `group`, weight is
    this rank's vocabulary slice [V / world, H], hidden is the same on every rank, and the hidden-state gradient
    is summed over the group here (do not also pass hidden through a copy-to-tensor-parallel-region)."""
    op = "linear_logprobs_and_entropy"
    check_linear(op, hidden, weight, tokens)
    check_temperature_and_chunk(op, temperature, chunk_size)
    rank, world = _rank_and_world(group)
    check_token_range(op, tokens, weight.shape[0] * world)
    return _LinearLogprobEntropy.apply(
        hidden, weight, tokens, 1.0 / temperature, chunk_size, group if world > 1 else None, rank * weight.shape[0]
    )


def naive_logprobs_and_entropy(
    logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """log_softmax + gather over the whole [N, V] block: the textbook formula, for tests and benchmarks."""
    log_p = torch.log_softmax(logits.float() / temperature, dim=-1)
    log_probs = log_p.gather(1, tokens.long().unsqueeze(1)).squeeze(1)
    entropy = -(log_p.exp() * log_p).sum(dim=-1)
    return log_probs, entropy
