"""Kernels: ops with a torch reference and hardware implementations chosen by the backend.

    from slime.kernels import get_op
    logprobs_and_entropy = get_op("logprobs_and_entropy", backend=backend)   # triton on GPU backends
    log_probs, entropy = logprobs_and_entropy(logits, tokens, temperature=1.0)

The module-level functions below are the torch references (any device).
"""

from slime.kernels.checks import KernelInputError
from slime.kernels.logprob import (
    DEFAULT_CHUNK_SIZE,
    linear_logprobs_and_entropy,
    logprobs_and_entropy,
    naive_logprobs_and_entropy,
    vocab_parallel_logprobs_and_entropy,
)
from slime.kernels.registry import OpSelectionError, get_op, op_implementations, op_names, register_op

register_op(
    "logprobs_and_entropy",
    "log-probs of given tokens and entropy from logits [N, V], chunked online log-sum-exp",
    torch="slime.kernels.logprob:logprobs_and_entropy",
    triton="slime.kernels.logprob_triton:logprobs_and_entropy",
    jax="slime.kernels.logprob_jax:logprobs_and_entropy",  # takes and returns jax arrays
)
register_op(
    "vocab_parallel_logprobs_and_entropy",
    "the same with logits split over tensor-parallel ranks (max and sums all-reduced)",
    torch="slime.kernels.logprob:vocab_parallel_logprobs_and_entropy",
    triton="slime.kernels.logprob_triton:vocab_parallel_logprobs_and_entropy",
)
register_op(
    "linear_logprobs_and_entropy",
    "the same from hidden states [N, H] and the output weight [V, H]; logits never exist whole",
    # the chunk matmuls dominate and already run on the vendor GEMM; no kernel of ours beats it yet
    torch="slime.kernels.logprob:linear_logprobs_and_entropy",
)
__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "KernelInputError",
    "OpSelectionError",
    "get_op",
    "linear_logprobs_and_entropy",
    "logprobs_and_entropy",
    "naive_logprobs_and_entropy",
    "op_implementations",
    "op_names",
    "register_op",
    "vocab_parallel_logprobs_and_entropy",
]
