"""Input validation shared by every implementation: one line naming the op, the argument and the shapes."""

from __future__ import annotations

import torch


class KernelInputError(ValueError):
    """A caller passed tensors an op cannot take. The message is one line: op, argument, shapes/dtypes/devices."""


FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_logits_and_tokens(op: str, logits: torch.Tensor, tokens: torch.Tensor, logits_name: str = "logits") -> None:
    if logits.dim() != 2:
        raise KernelInputError(f"{op}: {logits_name} must be 2-D [N, V], got shape {tuple(logits.shape)}")
    if logits.dtype not in FLOAT_DTYPES:
        raise KernelInputError(f"{op}: {logits_name} dtype must be float32, bfloat16 or float16, got {logits.dtype}")
    check_tokens(op, tokens, logits.shape[0], logits.device, f"{logits_name} {tuple(logits.shape)}")


def check_tokens(op: str, tokens: torch.Tensor, rows: int, device: torch.device, against: str) -> None:
    if tokens.dim() != 1 or tokens.shape[0] != rows:
        raise KernelInputError(f"{op}: tokens must be 1-D [N] matching {against}, got tokens {tuple(tokens.shape)}")
    if tokens.dtype not in (torch.int64, torch.int32):
        raise KernelInputError(f"{op}: tokens dtype must be int64 or int32, got {tokens.dtype}")
    if tokens.device != device:
        raise KernelInputError(f"{op}: tokens on {tokens.device} but {against} on {device}")


def check_token_range(op: str, tokens: torch.Tensor, vocab: int) -> None:
    """Token ids must index the (full) vocabulary; an out-of-range id would silently read another row's memory."""
    if tokens.numel() == 0:
        return
    low, high = int(tokens.min()), int(tokens.max())
    if low < 0 or high >= vocab:
        raise KernelInputError(f"{op}: token ids must lie in [0, {vocab}), got min {low} max {high}")


def check_linear(op: str, hidden: torch.Tensor, weight: torch.Tensor, tokens: torch.Tensor) -> None:
    if hidden.dim() != 2:
        raise KernelInputError(f"{op}: hidden must be 2-D [N, H], got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise KernelInputError(
            f"{op}: weight must be [V, H] with H = hidden.shape[1]; got hidden {tuple(hidden.shape)} "
            f"weight {tuple(weight.shape)}"
        )
    if hidden.dtype not in FLOAT_DTYPES or weight.dtype != hidden.dtype:
        raise KernelInputError(
            f"{op}: hidden and weight must share a float dtype, got {hidden.dtype} and {weight.dtype}"
        )
    if weight.device != hidden.device:
        raise KernelInputError(f"{op}: weight on {weight.device} but hidden on {hidden.device}")
    check_tokens(op, tokens, hidden.shape[0], hidden.device, f"hidden {tuple(hidden.shape)}")


def check_temperature_and_chunk(op: str, temperature: float, chunk_size: int) -> None:
    if not temperature > 0:
        raise KernelInputError(f"{op}: temperature must be > 0, got {temperature}")
    if chunk_size < 1:
        raise KernelInputError(f"{op}: chunk_size must be >= 1, got {chunk_size}")
