"""Triton passes for the chunked log-prob/entropy ops (GPU backends; on CPU only under TRITON_INTERPRET=1).

One program per row walks the vocabulary in BLOCK_V columns: the stats kernel keeps the online (m, s, w) of
slime/kernels/logprob.py in registers and reads the token's logit with one masked scalar load; the grad kernel
recomputes p from the saved lse and writes d logits in the input dtype. Combining across tensor-parallel
ranks and the autograd wiring are shared with the torch reference (`logprobs_and_entropy_with`).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from slime.kernels.checks import KernelInputError
from slime.kernels.logprob import (
    DEFAULT_CHUNK_SIZE,
    FP32_LOWEST,
    VocabPasses,
    logprobs_and_entropy_with,
    vocab_parallel_logprobs_and_entropy_with,
)

# Columns per program step. The chunk_size argument of the public functions is the torch reference's memory
# knob; here the working set is BLOCK_V registers per program, so the block is chosen for the hardware.
MAX_BLOCK_V = 4096


@triton.jit
def _stats_kernel(
    logits_ptr,
    stride_row,
    local_tokens_ptr,
    m_ptr,
    s_ptr,
    w_ptr,
    token_z_ptr,
    vocab,
    inv_temp,
    lowest,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    token = tl.load(local_tokens_ptr + row)
    in_range = (token >= 0) & (token < vocab)
    token_raw = tl.load(row_ptr + tl.where(in_range, token, 0), mask=in_range, other=0.0).to(tl.float32)
    token_z = tl.where(in_range, tl.maximum(token_raw * inv_temp, lowest), 0.0)

    m = tl.zeros((), tl.float32) + lowest  # finite start: s = 0 makes the first rescale terms exactly 0
    s = tl.zeros((), tl.float32)
    w = tl.zeros((), tl.float32)
    for start in range(0, vocab, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        valid = cols < vocab
        z = tl.load(row_ptr + cols, mask=valid, other=float("-inf")).to(tl.float32) * inv_temp
        z = tl.maximum(z, lowest)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        rescale = tl.exp(m - m_new)
        shift = s * (m - m_new)
        shifted = z - m_new
        e = tl.where(valid, tl.exp(shifted), 0.0)
        w = (w + shift) * rescale + tl.sum(e * shifted, axis=0)
        s = s * rescale + tl.sum(e, axis=0)
        m = m_new
    tl.store(m_ptr + row, m)
    tl.store(s_ptr + row, s)
    tl.store(w_ptr + row, w)
    tl.store(token_z_ptr + row, token_z)


@triton.jit
def _grad_kernel(
    logits_ptr,
    stride_row,
    grad_ptr,
    grad_stride_row,
    local_tokens_ptr,
    lse_ptr,
    entropy_ptr,
    grad_log_probs_ptr,
    grad_entropy_ptr,
    vocab,
    inv_temp,
    lowest,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    grad_row_ptr = grad_ptr + row * grad_stride_row
    token = tl.load(local_tokens_ptr + row)
    lse = tl.load(lse_ptr + row)
    entropy = tl.load(entropy_ptr + row)
    g_lp = tl.load(grad_log_probs_ptr + row)
    g_ent = tl.load(grad_entropy_ptr + row)
    for start in range(0, vocab, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        valid = cols < vocab
        z = tl.load(row_ptr + cols, mask=valid, other=0.0).to(tl.float32) * inv_temp
        log_p = tl.maximum(z, lowest) - lse
        p = tl.exp(log_p)
        # p multiplies first: for masked entries log p is ~ -3.4e38 and only p = 0 keeps the product finite
        g = -((p * (log_p + entropy)) * g_ent + p * g_lp)
        g = tl.where(cols == token, g + g_lp, g) * inv_temp
        tl.store(grad_row_ptr + cols, g.to(grad_ptr.dtype.element_ty), mask=valid)


def _block_v(vocab: int) -> int:
    return min(MAX_BLOCK_V, triton.next_power_of_2(max(vocab, 16)))


def _check_runnable(logits: torch.Tensor) -> None:
    if logits.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise KernelInputError(
            "triton logprobs_and_entropy: logits are on cpu; the triton implementation needs accelerator tensors "
            "(or TRITON_INTERPRET=1 set before triton is imported); use impl='torch' on cpu"
        )


def _row_major(logits: torch.Tensor) -> torch.Tensor:
    return logits if logits.stride(1) == 1 else logits.contiguous()


def triton_stats(logits: torch.Tensor, local_tokens: torch.Tensor, inv_temp: float, chunk_size: int):
    _check_runnable(logits)
    logits = _row_major(logits)
    rows, vocab = logits.shape
    out = torch.empty((4, rows), dtype=torch.float32, device=logits.device)
    if rows:
        _stats_kernel[(rows,)](
            logits,
            logits.stride(0),
            local_tokens.contiguous(),
            out[0],
            out[1],
            out[2],
            out[3],
            vocab,
            inv_temp,
            FP32_LOWEST,
            BLOCK_V=_block_v(vocab),
        )
    return out[0], out[1], out[2], out[3]


def triton_grad(
    logits: torch.Tensor,
    local_tokens: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor,
    grad_log_probs: torch.Tensor,
    grad_entropy: torch.Tensor,
    inv_temp: float,
    chunk_size: int,
) -> torch.Tensor:
    logits = _row_major(logits)
    rows, vocab = logits.shape
    grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
    if rows:
        _grad_kernel[(rows,)](
            logits,
            logits.stride(0),
            grad,
            grad.stride(0),
            local_tokens.contiguous(),
            lse.contiguous(),
            entropy.contiguous(),
            grad_log_probs,
            grad_entropy,
            vocab,
            inv_temp,
            FP32_LOWEST,
            BLOCK_V=_block_v(vocab),
        )
    return grad


TRITON_PASSES = VocabPasses(name="triton", stats=triton_stats, grad=triton_grad)


def logprobs_and_entropy(
    logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton implementation of slime.kernels.logprob.logprobs_and_entropy (same contract)."""
    return logprobs_and_entropy_with(TRITON_PASSES, logits, tokens, temperature, chunk_size)


def vocab_parallel_logprobs_and_entropy(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    group,
    temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton implementation of slime.kernels.logprob.vocab_parallel_logprobs_and_entropy (same contract)."""
    return vocab_parallel_logprobs_and_entropy_with(TRITON_PASSES, logits, tokens, group, temperature, chunk_size)
