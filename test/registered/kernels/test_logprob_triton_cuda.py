"""The Triton log-prob/entropy kernels compiled and run on a GPU (NVIDIA, or AMD through ROCm torch's "cuda"
device) against the torch reference on the same GPU, at the benchmark's vocabulary (151,936) and a realistic row count.

Tolerances: forward 1e-4 absolute (fp32 sums of 151,936 terms in a different order); gradients 1e-6 absolute
+ 1e-4 relative in fp32, one bf16 ulp (rtol 2**-7) in bf16."""

import pytest
import torch

from slime.testing.ci_register import register_cuda_ci, register_rocm_ci

register_cuda_ci(est_time=60, suite="base-b-test-1-gpu")
register_rocm_ci(est_time=60, suite="base-b-test-1-gpu-amd")

pytestmark = [pytest.mark.cuda, pytest.mark.rocm]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_triton_matches_reference_on_gpu(dtype, temperature):
    if not torch.cuda.is_available():
        pytest.skip("no GPU")
    from slime.kernels import get_op

    triton_op = get_op("logprobs_and_entropy", impl="triton")
    reference = get_op("logprobs_and_entropy", impl="torch")
    gen = torch.Generator(device="cuda").manual_seed(0)
    logits = (torch.randn(512, 151_936, device="cuda", generator=gen) * 3).to(dtype)
    tokens = torch.randint(0, 151_936, (512,), device="cuda", generator=gen)
    grads = torch.randn(2, 512, device="cuda", generator=gen)

    def run(op):
        leaf = logits.clone().requires_grad_()
        log_probs, entropy = op(leaf, tokens, temperature)
        (log_probs * grads[0] + entropy * grads[1]).sum().backward()
        return log_probs, entropy, leaf.grad

    got, want = run(triton_op), run(reference)
    torch.testing.assert_close(got[0], want[0], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(got[1], want[1], atol=1e-4, rtol=1e-5)
    grad_tol = dict(atol=1e-6, rtol=1e-4) if dtype == torch.float32 else dict(atol=1e-6, rtol=2**-7)
    torch.testing.assert_close(got[2].float(), want[2].float(), **grad_tol)
