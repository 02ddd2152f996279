"""The torch reference of the chunked log-prob/entropy ops against closed forms and the textbook formula.

Tolerances: fp32 forward 2e-6 absolute on values of size ~10 (both sides accumulate in fp32 in a different order);
fp32 gradients 5e-6 absolute + 1e-5 relative (chunk_size=1 rescales the running sum once per column); bf16 logits are upcast exactly, so forward values match the fp32 formula on the upcast
logits to the same 2e-6, and bf16 gradients match to one bf16 ulp (rtol 2**-7).
"""

import math

import pytest
import torch

from slime.kernels import (
    KernelInputError,
    linear_logprobs_and_entropy,
    logprobs_and_entropy,
    naive_logprobs_and_entropy,
)
from slime.kernels.memory import peak_extra_host_bytes
from slime.testing.ci_register import register_cpu_ci

register_cpu_ci(est_time=8, suite="base-a-test-cpu")

torch.set_num_threads(1)
FP32 = dict(atol=2e-6, rtol=1e-6)
FP32_GRAD = dict(atol=5e-6, rtol=1e-5)


def random_case(rows=6, vocab=301, scale=4.0, dtype=torch.float32, seed=0):
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


def test_uniform_logits_give_minus_log_v_and_log_v():
    vocab = 1000
    log_probs, entropy = logprobs_and_entropy(torch.full((3, vocab), 2.5), torch.tensor([0, 7, 999]), chunk_size=128)
    assert torch.allclose(log_probs, torch.full((3,), -math.log(vocab)), atol=1e-6)
    assert torch.allclose(entropy, torch.full((3,), math.log(vocab)), atol=1e-5)


def test_two_token_distribution_closed_form():
    # logits (0, a): p = (1/(1+e^a), e^a/(1+e^a)); entropy = -sum p log p
    a = 1.3
    logits = torch.tensor([[0.0, a], [0.0, a]])
    log_probs, entropy = logprobs_and_entropy(logits, torch.tensor([0, 1]), chunk_size=1)
    p1 = math.exp(a) / (1 + math.exp(a))
    p0 = 1 - p1
    assert log_probs.tolist() == pytest.approx([math.log(p0), math.log(p1)], abs=1e-6)
    assert entropy.tolist() == pytest.approx([-(p0 * math.log(p0) + p1 * math.log(p1))] * 2, abs=1e-6)


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 301, 4096])
@pytest.mark.parametrize("temperature", [1.0, 0.6, 1.7])
def test_fp32_matches_log_softmax_forward_and_backward(chunk_size, temperature):
    logits, tokens, grads = random_case()
    got = forward_backward(logprobs_and_entropy, logits, tokens, grads, temperature=temperature, chunk_size=chunk_size)
    want = forward_backward(naive_logprobs_and_entropy, logits, tokens, grads, temperature=temperature)
    torch.testing.assert_close(got[0], want[0], **FP32)
    torch.testing.assert_close(got[1], want[1], **FP32)
    torch.testing.assert_close(got[2], want[2], **FP32_GRAD)


def test_gradient_matches_float64_autograd():
    logits, tokens, grads = random_case(rows=4, vocab=50, seed=3)
    got = forward_backward(logprobs_and_entropy, logits, tokens, grads, temperature=0.8, chunk_size=16)
    want = forward_backward(naive_logprobs_and_entropy, logits.double(), tokens, grads.double(), temperature=0.8)
    torch.testing.assert_close(got[2], want[2].float(), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_bf16_logits_compute_in_fp32_and_return_bf16_grads(temperature):
    logits, tokens, grads = random_case(dtype=torch.bfloat16, seed=1)
    log_probs, entropy, grad = forward_backward(
        logprobs_and_entropy, logits, tokens, grads, chunk_size=50, temperature=temperature
    )
    want = forward_backward(naive_logprobs_and_entropy, logits.float(), tokens, grads, temperature=temperature)
    assert log_probs.dtype == torch.float32 and grad.dtype == torch.bfloat16
    torch.testing.assert_close(log_probs, want[0], **FP32)
    torch.testing.assert_close(entropy, want[1], **FP32)
    torch.testing.assert_close(grad.float(), want[2].to(torch.bfloat16).float(), rtol=2**-7, atol=1e-6)


def test_masked_vocabulary_entries_are_exact_zeros_not_nan():
    logits, tokens, grads = random_case(rows=3, vocab=40)
    logits[:, 5:25] = float("-inf")
    tokens = torch.tensor([0, 30, 39])
    log_probs, entropy, grad = forward_backward(logprobs_and_entropy, logits, tokens, grads, chunk_size=8)
    kept = torch.cat([logits[:, :5], logits[:, 25:]], dim=1)
    want = forward_backward(naive_logprobs_and_entropy, kept, torch.tensor([0, 10, 19]), grads)
    torch.testing.assert_close(log_probs, want[0], **FP32)
    torch.testing.assert_close(entropy, want[1], **FP32)
    assert torch.equal(grad[:, 5:25].abs(), torch.zeros(3, 20))
    torch.testing.assert_close(torch.cat([grad[:, :5], grad[:, 25:]], dim=1), want[2], **FP32_GRAD)


def test_input_logits_are_not_modified():
    logits, tokens, _ = random_case()
    before = logits.clone()
    logprobs_and_entropy(logits, tokens, temperature=0.5, chunk_size=32)
    assert torch.equal(logits, before)


def test_only_one_output_used_in_loss():
    logits, tokens, _ = random_case()
    leaf = logits.clone().requires_grad_()
    log_probs, _ = logprobs_and_entropy(leaf, tokens, chunk_size=64)
    log_probs.sum().backward()
    naive_leaf = logits.clone().requires_grad_()
    naive_logprobs_and_entropy(naive_leaf, tokens)[0].sum().backward()
    torch.testing.assert_close(leaf.grad, naive_leaf.grad, **FP32_GRAD)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_form_matches_matmul_then_log_softmax(dtype):
    gen = torch.Generator().manual_seed(5)
    hidden = torch.randn(5, 24, generator=gen).to(dtype)
    weight = (torch.randn(130, 24, generator=gen) / 3).to(dtype)
    tokens = torch.randint(0, 130, (5,), generator=gen)
    grads = torch.randn(2, 5, generator=gen)

    def run(fn):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        log_probs, entropy = fn(h, w)
        (log_probs * grads[0] + entropy * grads[1]).sum().backward()
        return log_probs.detach(), entropy.detach(), h.grad, w.grad

    got = run(lambda h, w: linear_logprobs_and_entropy(h, w, tokens, temperature=0.9, chunk_size=32))
    want = run(lambda h, w: naive_logprobs_and_entropy(h @ w.t(), tokens, temperature=0.9))
    tol = FP32 if dtype == torch.float32 else dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[0], want[0], **tol)
    torch.testing.assert_close(got[1], want[1], **tol)
    grad_tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(got[2].float(), want[2].float(), **grad_tol)
    torch.testing.assert_close(got[3].float(), want[3].float(), **grad_tol)


def test_peak_memory_is_one_chunk_not_n_by_v():
    rows, vocab, chunk = 64, 8192, 512
    logits, tokens, grads = random_case(rows=rows, vocab=vocab)
    logits.requires_grad_()

    def forward_only(fn):
        with torch.no_grad():
            return peak_extra_host_bytes(lambda: fn(logits, tokens))[1]

    full_fp32 = rows * vocab * 4
    chunked = forward_only(lambda x, t: logprobs_and_entropy(x, t, chunk_size=chunk))
    naive = forward_only(naive_logprobs_and_entropy)
    assert naive >= 2 * full_fp32  # log_softmax and its exp
    assert chunked <= 3 * rows * chunk * 4 + 64 * rows * 4  # two fp32 chunk buffers + per-row vectors

    def forward_backward_peak():
        log_probs, entropy = logprobs_and_entropy(logits, tokens, chunk_size=chunk)
        (log_probs + entropy).sum().backward()

    peak = peak_extra_host_bytes(forward_backward_peak)[1]
    logits.grad = None
    # the returned gradient itself is N x V; beyond it only chunk buffers
    assert peak <= full_fp32 + 3 * rows * chunk * 4 + 64 * rows * 4


@pytest.mark.parametrize(
    "call, message",
    [
        (
            lambda: logprobs_and_entropy(torch.zeros(2, 3, 4), torch.zeros(2, dtype=torch.long)),
            r"logprobs_and_entropy: logits must be 2-D \[N, V\], got shape \(2, 3, 4\)",
        ),
        (
            lambda: logprobs_and_entropy(torch.zeros(2, 5), torch.zeros(3, dtype=torch.long)),
            r"logprobs_and_entropy: tokens must be 1-D \[N\] matching logits \(2, 5\), got tokens \(3,\)",
        ),
        (
            lambda: logprobs_and_entropy(torch.zeros(2, 5, dtype=torch.int32), torch.zeros(2, dtype=torch.long)),
            r"logprobs_and_entropy: logits dtype must be float32, bfloat16 or float16, got torch.int32",
        ),
        (
            lambda: logprobs_and_entropy(torch.zeros(2, 5), torch.zeros(2)),
            r"logprobs_and_entropy: tokens dtype must be int64 or int32, got torch.float32",
        ),
        (
            lambda: logprobs_and_entropy(torch.zeros(2, 5), torch.tensor([0, 5])),
            r"logprobs_and_entropy: token ids must lie in \[0, 5\), got min 0 max 5",
        ),
        (
            lambda: logprobs_and_entropy(torch.zeros(2, 5), torch.tensor([0, 1]), temperature=0.0),
            r"temperature must be > 0",
        ),
        (
            lambda: logprobs_and_entropy(torch.zeros(2, 5), torch.tensor([0, 1], device="meta")),
            r"logprobs_and_entropy: tokens on meta but logits \(2, 5\) on cpu",
        ),
        (
            lambda: linear_logprobs_and_entropy(torch.zeros(2, 8), torch.zeros(5, 6), torch.tensor([0, 1])),
            r"linear_logprobs_and_entropy: weight must be \[V, H\] with H = hidden.shape\[1\]; "
            r"got hidden \(2, 8\) weight \(5, 6\)",
        ),
        (
            lambda: linear_logprobs_and_entropy(
                torch.zeros(2, 8), torch.zeros(5, 8, dtype=torch.bfloat16), torch.tensor([0, 1])
            ),
            r"linear_logprobs_and_entropy: hidden and weight must share a float dtype",
        ),
    ],
)
def test_bad_input_is_one_line_naming_op_and_shapes(call, message):
    with pytest.raises(KernelInputError, match=message) as info:
        call()
    assert "\n" not in str(info.value)
