"""The Triton log-prob/entropy kernels under TRITON_INTERPRET=1 against the torch reference (the same kernels
are compiled for GPU targets in test_logprob_triton_compile.py).

Tolerances (fp32 math in both; different summation order):
  forward log-probs / entropy, fp32 and bf16 logits: atol 2e-6, rtol 1e-6
  gradients, fp32 logits: atol 2e-6, rtol 1e-5
  gradients, bf16 logits: one bf16 ulp (rtol 2**-7, atol 1e-6): a 1e-7 difference in fp32 may round either way
"""

import os
import sys

# The interpreter is chosen when triton is imported; this file runs in its own process (run_suite.py).
os.environ["TRITON_INTERPRET"] = "1"
_triton_imported_before = "triton" in sys.modules

import pytest  # noqa: E402
import torch  # noqa: E402

from slime.kernels import KernelInputError, get_op, logprobs_and_entropy  # noqa: E402
from slime.testing.ci_register import register_cpu_ci  # noqa: E402

register_cpu_ci(est_time=8, suite="base-b-test-cpu")

pytestmark = pytest.mark.skipif(
    _triton_imported_before, reason="triton was imported before TRITON_INTERPRET=1 could be set; run this file alone"
)
torch.set_num_threads(1)

FWD = dict(atol=2e-6, rtol=1e-6)
GRAD = {torch.float32: dict(atol=2e-6, rtol=1e-5), torch.bfloat16: dict(atol=1e-6, rtol=2**-7)}


def triton_op():
    return get_op("logprobs_and_entropy", impl="triton")


def case(rows, vocab, dtype, seed=0, scale=4.0):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(rows, vocab, generator=gen) * scale).to(dtype)
    tokens = torch.randint(0, vocab, (rows,), generator=gen)
    grads = torch.randn(2, rows, generator=gen)
    return logits, tokens, grads


def forward_backward(fn, logits, tokens, grads, **kwargs):
    leaf = logits.detach().clone().requires_grad_()
    log_probs, entropy = fn(leaf, tokens, **kwargs)
    (log_probs * grads[0] + entropy * grads[1]).sum().backward()
    return log_probs.detach(), entropy.detach(), leaf.grad


def assert_matches_reference(logits, tokens, grads, temperature=1.0):
    got = forward_backward(triton_op(), logits, tokens, grads, temperature=temperature)
    want = forward_backward(logprobs_and_entropy, logits, tokens, grads, temperature=temperature, chunk_size=128)
    torch.testing.assert_close(got[0], want[0], **FWD)
    torch.testing.assert_close(got[1], want[1], **FWD)
    assert got[2].dtype == logits.dtype
    torch.testing.assert_close(got[2].float(), want[2].float(), **GRAD[logits.dtype])


def test_registry_forces_the_triton_implementation():
    assert triton_op().__module__ == "slime.kernels.logprob_triton"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_matches_reference_vocab_not_a_power_of_two(dtype, temperature):
    assert_matches_reference(*case(rows=5, vocab=300, dtype=dtype), temperature=temperature)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_reference_over_several_vocab_blocks(dtype):
    # 4096-column blocks: 9000 columns take three loop steps with a ragged tail
    assert_matches_reference(*case(rows=3, vocab=9000, dtype=dtype, seed=1))


def test_masked_entries_and_strided_rows():
    logits, tokens, grads = case(rows=4, vocab=200, dtype=torch.float32, seed=2)
    logits[:, 50:120] = float("-inf")
    tokens = torch.tensor([0, 10, 130, 199])
    wide = torch.zeros(4, 256)
    wide[:, :200] = logits
    strided = wide[:, :200]  # row stride 256, not 200
    assert strided.stride(0) == 256
    got = forward_backward(triton_op(), strided, tokens, grads)
    want = forward_backward(logprobs_and_entropy, logits, tokens, grads, chunk_size=64)
    assert not any(t.isnan().any() for t in got)
    torch.testing.assert_close(got[0], want[0], **FWD)
    torch.testing.assert_close(got[1], want[1], **FWD)
    torch.testing.assert_close(got[2], want[2], **GRAD[torch.float32])


def test_cpu_tensors_without_the_interpreter_get_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    logits, tokens, _ = case(rows=2, vocab=10, dtype=torch.float32)
    with pytest.raises(KernelInputError, match=r"triton logprobs_and_entropy: logits are on cpu.*impl='torch'"):
        triton_op()(logits, tokens)
