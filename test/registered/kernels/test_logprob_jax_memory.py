"""Peak extra memory of the JAX log-prob/entropy op at N=4096, V=151,936 (a Qwen vocabulary), from the compiled
programs' memory analysis (JAX on CPU keeps no live memory statistics): the chunked op's temporary buffers, forward
and forward+backward, are at most 1/8 of the naive log-softmax's. Only compiled, never run (the logits would be
2.4 GB)."""

import pytest

from slime.testing.ci_register import register_cpu_ci

register_cpu_ci(est_time=15, suite="base-b-test-cpu")

jax = pytest.importorskip("jax", reason="the JAX kernel needs jax (pip install 'slime[test]')")
jnp = jax.numpy

from slime.kernels.logprob_jax import logprobs_and_entropy  # noqa: E402
from slime.training.jax.trainer import LOG_PROB_CHUNK  # noqa: E402

N, V = 4096, 151_936


def naive(logits, tokens):
    log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(log_p, tokens[:, None], axis=1)[:, 0], -(jnp.exp(log_p) * log_p).sum(-1)


def chunked(logits, tokens):
    return logprobs_and_entropy(logits, tokens, chunk_size=LOG_PROB_CHUNK)


def _loss_grad(op):
    def loss(logits, tokens, weights):
        log_probs, entropy = op(logits, tokens)
        return (log_probs * weights).sum() + 0.01 * (entropy * weights).sum()

    return jax.grad(loss)


def _temp_bytes(fn, *args) -> int:
    return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_peak_extra_memory_is_at_most_an_eighth_of_naive():
    logits, tokens = jax.ShapeDtypeStruct((N, V), jnp.float32), jax.ShapeDtypeStruct((N,), jnp.int32)
    weights = jax.ShapeDtypeStruct((N,), jnp.float32)
    naive_fwd, ours_fwd = _temp_bytes(naive, logits, tokens), _temp_bytes(chunked, logits, tokens)
    naive_bwd = _temp_bytes(_loss_grad(naive), logits, tokens, weights)
    ours_bwd = _temp_bytes(_loss_grad(chunked), logits, tokens, weights)
    full = N * V * 4
    assert naive_fwd >= full and naive_bwd >= full  # the naive op does hold an N x V fp32 block
    assert ours_fwd * 8 <= naive_fwd, (ours_fwd, naive_fwd)
    assert ours_bwd * 8 <= naive_bwd, (ours_bwd, naive_bwd)
    print(f"temp MiB: forward naive {naive_fwd / 2**20:.0f} chunked {ours_fwd / 2**20:.0f}; "
          f"with backward naive {naive_bwd / 2**20:.0f} chunked {ours_bwd / 2**20:.0f}")  # fmt: skip
