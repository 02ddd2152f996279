"""The Triton log-prob/entropy kernels compiled (not run) for an NVIDIA sm_90 and an AMD gfx942 target.

The interpreter (test_logprob_triton_interpret.py) runs kernels as numpy and tolerates type errors that the real
compiler rejects; compiling to cubin / hsaco here catches those without a GPU. Triton must not be in interpreter
mode in this process, so this is a separate file.
"""

import os

import pytest

from slime.testing.ci_register import register_cpu_ci

register_cpu_ci(est_time=10, suite="base-b-test-cpu")

STATS_SIGNATURE = {
    "logits_ptr": "*bf16",
    "stride_row": "i64",
    "local_tokens_ptr": "*i64",
    "m_ptr": "*fp32",
    "s_ptr": "*fp32",
    "w_ptr": "*fp32",
    "token_z_ptr": "*fp32",
    "vocab": "i32",
    "inv_temp": "fp32",
    "lowest": "fp32",
    "BLOCK_V": "constexpr",
}
GRAD_SIGNATURE = {
    "logits_ptr": "*bf16",
    "stride_row": "i64",
    "grad_ptr": "*bf16",
    "grad_stride_row": "i64",
    "local_tokens_ptr": "*i64",
    "lse_ptr": "*fp32",
    "entropy_ptr": "*fp32",
    "grad_log_probs_ptr": "*fp32",
    "grad_entropy_ptr": "*fp32",
    "vocab": "i32",
    "inv_temp": "fp32",
    "lowest": "fp32",
    "BLOCK_V": "constexpr",
}


@pytest.mark.parametrize("target", [("cuda", 90, 32), ("hip", "gfx942", 64)], ids=["sm90", "gfx942"])
def test_kernels_compile_for_gpu_targets(target, tmp_path, monkeypatch):
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("compiling needs triton outside interpreter mode (run this file in its own process)")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from slime.kernels import logprob_triton

    binary = {"cuda": "cubin", "hip": "hsaco"}[target[0]]
    for kernel, signature in (
        (logprob_triton._stats_kernel, STATS_SIGNATURE),
        (logprob_triton._grad_kernel, GRAD_SIGNATURE),
    ):
        source = ASTSource(fn=kernel, signature=signature, constexprs={"BLOCK_V": logprob_triton.MAX_BLOCK_V})
        compiled = triton.compile(source, target=GPUTarget(*target))
        assert len(compiled.asm[binary]) > 0
