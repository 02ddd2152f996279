"""The JAX log-prob/entropy op (TPU kernel family) on the JAX CPU platform against the torch reference.

Tolerances: forward 2e-6 absolute; fp32 gradients 5e-6 absolute + 1e-5 relative; bf16 gradients one bf16 ulp
(rtol 2**-7); both sides compute in fp32 with different summation orders."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np
import pytest
import torch

from slime.kernels import KernelInputError, get_op, logprobs_and_entropy
from slime.testing.ci_register import register_cpu_ci

register_cpu_ci(est_time=14, suite="base-b-test-cpu")

jax = pytest.importorskip("jax")
jnp = jax.numpy
torch.set_num_threads(1)
FWD = dict(atol=2e-6, rtol=1e-6)
GRAD = {"float32": dict(atol=5e-6, rtol=1e-5), "bfloat16": dict(atol=1e-6, rtol=2**-7)}


def case(rows, vocab, dtype, seed=0, masked=None):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(rows, vocab, generator=gen) * 4).to(getattr(torch, dtype))
    if masked is not None:
        logits[:, masked] = float("-inf")
    tokens = torch.randint(0, vocab, (rows,), generator=gen)
    if masked is not None:
        tokens = torch.where((tokens >= masked.start) & (tokens < masked.stop), 0, tokens)
    grads = torch.randn(2, rows, generator=gen)
    return logits, tokens, grads


def to_jax(t):
    return jnp.asarray(t.float().numpy()).astype(jnp.bfloat16) if t.dtype == torch.bfloat16 else jnp.asarray(t.numpy())


def run_jax(logits, tokens, grads, temperature, chunk_size):
    op = get_op("logprobs_and_entropy", impl="jax")
    g_lp, g_ent = jnp.asarray(grads[0].numpy()), jnp.asarray(grads[1].numpy())

    def loss(x):
        log_probs, entropy = op(x, to_jax(tokens), temperature, chunk_size)
        return (log_probs * g_lp + entropy * g_ent).sum(), (log_probs, entropy)

    (_, (log_probs, entropy)), grad = jax.value_and_grad(loss, has_aux=True)(to_jax(logits))
    as_torch = lambda a: torch.from_numpy(np.array(a.astype(jnp.float32)))  # noqa: E731
    return as_torch(log_probs), as_torch(entropy), as_torch(grad), grad.dtype


def run_torch(logits, tokens, grads, temperature):
    leaf = logits.clone().requires_grad_()
    log_probs, entropy = logprobs_and_entropy(leaf, tokens, temperature, chunk_size=64)
    (log_probs * grads[0] + entropy * grads[1]).sum().backward()
    return log_probs.detach(), entropy.detach(), leaf.grad.float()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("temperature, chunk_size", [(1.0, 128), (0.7, 100), (1.3, 4096)])
def test_matches_torch_reference(dtype, temperature, chunk_size):
    logits, tokens, grads = case(rows=5, vocab=300, dtype=dtype)  # 300 = 2 full chunks of 128 + a shifted tail
    got = run_jax(logits, tokens, grads, temperature, chunk_size)
    want = run_torch(logits, tokens, grads, temperature)
    assert str(got[3]) == dtype
    torch.testing.assert_close(got[0], want[0], **FWD)
    torch.testing.assert_close(got[1], want[1], **FWD)
    torch.testing.assert_close(got[2], want[2], **GRAD[dtype])


def test_masked_entries_stay_finite():
    logits, tokens, grads = case(rows=3, vocab=90, dtype="float32", seed=4, masked=slice(20, 50))
    got = run_jax(logits, tokens, grads, 1.0, 32)
    want = run_torch(logits, tokens, grads, 1.0)
    assert not any(t.isnan().any() for t in got[:3])
    torch.testing.assert_close(got[0], want[0], **FWD)
    torch.testing.assert_close(got[2], want[2], **GRAD["float32"])
    assert torch.equal(got[2][:, 20:50].abs(), torch.zeros(3, 30))


def test_runs_under_jit():
    op = get_op("logprobs_and_entropy", impl="jax")
    logits, tokens, _ = case(rows=4, vocab=70, dtype="float32")
    jitted = jax.jit(lambda x, t: op(x, t, 0.9, 32))
    got = jitted(to_jax(logits), to_jax(tokens))
    want = logprobs_and_entropy(logits, tokens, 0.9)
    torch.testing.assert_close(torch.from_numpy(np.array(got[0])), want[0], **FWD)


def test_bad_shapes_name_the_op():
    op = get_op("logprobs_and_entropy", impl="jax")
    with pytest.raises(
        KernelInputError,
        match=r"logprobs_and_entropy \(jax\): tokens must be 1-D \[N\] matching "
        r"logits \(2, 5\), got tokens \(3,\)",
    ):
        op(jnp.zeros((2, 5)), jnp.zeros(3, dtype=jnp.int32))
