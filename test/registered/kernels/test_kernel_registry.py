"""The op registry: backend-chosen implementations, forced selection, one-line errors, lazy imports."""

import subprocess
import sys
from pathlib import Path

import pytest

from slime.backends import SystemView, get_backend_class
from slime.kernels import OpSelectionError, get_op, logprob, op_implementations, op_names
from slime.kernels.registry import impl_importable
from slime.testing.ci_register import register_cpu_ci

register_cpu_ci(est_time=6, suite="base-a-test-cpu")

REPO = Path(__file__).resolve().parents[3]
LOGPROB_OPS = ("linear_logprobs_and_entropy", "logprobs_and_entropy", "vocab_parallel_logprobs_and_entropy")


def backend(name):
    return get_backend_class(name)(SystemView.real())


def test_registered_ops():
    assert op_names() == LOGPROB_OPS


def test_gpu_backends_use_triton_where_an_op_has_it_and_cpu_uses_torch():
    assert op_implementations(backend("cpu")) == dict.fromkeys(LOGPROB_OPS, "torch")
    for name in ("cuda", "rocm"):
        assert op_implementations(backend(name)) == {
            "linear_logprobs_and_entropy": "torch",
            "logprobs_and_entropy": "triton",
            "vocab_parallel_logprobs_and_entropy": "triton",
        }
    # the TPU backend uses JAX where an op has it (jax comes with the test extra), the reference elsewhere
    jax_or_torch = "jax" if impl_importable("jax") else "torch"
    assert op_implementations(backend("tpu")) == {
        "linear_logprobs_and_entropy": "torch",
        "logprobs_and_entropy": jax_or_torch,
        "vocab_parallel_logprobs_and_entropy": "torch",
    }


def test_get_op_follows_the_backend_and_can_be_forced():
    assert get_op("logprobs_and_entropy", backend=backend("cpu")) is logprob.logprobs_and_entropy
    assert get_op("logprobs_and_entropy", impl="torch", backend=backend("cuda")) is logprob.logprobs_and_entropy
    # auto-detection on this machine picks the cpu backend
    assert get_op("vocab_parallel_logprobs_and_entropy") is logprob.vocab_parallel_logprobs_and_entropy


def test_forcing_a_missing_implementation_is_one_line():
    with pytest.raises(
        OpSelectionError,
        match=r"^op 'linear_logprobs_and_entropy' has no 'triton' implementation; "
        r"choose one of: torch$",
    ):
        get_op("linear_logprobs_and_entropy", impl="triton")
    with pytest.raises(
        OpSelectionError,
        match=r"^op 'logprobs_and_entropy' has no 'cpp' implementation; "
        r"choose one of: jax, torch, triton$",
    ):
        get_op("logprobs_and_entropy", impl="cpp")
    with pytest.raises(OpSelectionError, match=r"^unknown op 'softmax'; registered ops: linear_logprobs_and_entropy"):
        get_op("softmax")


def test_listing_imports_neither_triton_nor_jax():
    code = (
        "import sys; from slime.backends import select_backend; from slime.kernels import op_implementations;"
        "print(op_implementations(select_backend('cpu')));"
        "print([m for m in ('triton', 'jax') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip().splitlines()[-1] == "[]"
