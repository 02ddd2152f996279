"""The ops slime puts into megatron's layer spec.

SdpaCoreAttention: in 16 bits on a CPU host, rows of up to FLOAT32_ATTENTION_MAX_TOKENS tokens attend in float32
(output and gradients those of float32 SDPA on the same 16-bit inputs, rounded once), longer rows in the model's own
dtype; float32 models are untouched.

RMSNorm: its hand-written backward passes gradcheck in float64; in float32 it matches torch's RMSNorm (forward and
gradients); 16-bit input gives 16-bit output and input gradient and a float32 weight gradient."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType

from slime.models.attention import FLOAT32_ATTENTION_MAX_TOKENS, SdpaCoreAttention
from slime.models.rms_norm import RMSNorm
from slime.testing.ci_register import register_cpu_ci

register_cpu_ci(est_time=12, suite="base-b-test-cpu")

HEADS, GROUPS, HEAD_DIM, BATCH = 4, 2, 16, 3


def layer() -> SimpleNamespace:
    """The attributes SdpaCoreAttention.forward reads from megatron's DotProductAttention."""
    return SimpleNamespace(
        attn_mask_type=AttnMaskType.causal,
        num_attention_heads_per_partition=HEADS,
        num_query_groups_per_partition=GROUPS,
        attention_dropout=torch.nn.Dropout(0.0),
        training=True,
        softmax_scale=HEAD_DIM**-0.5,
        hidden_size_per_partition=HEADS * HEAD_DIM,
    )


def inputs(tokens: int, dtype: torch.dtype) -> list[torch.Tensor]:
    """query [s, b, heads, d], key and value [s, b, groups, d] (megatron's layout), leaf tensors."""
    g = torch.Generator().manual_seed(tokens)
    shapes = [(tokens, BATCH, HEADS, HEAD_DIM)] + [(tokens, BATCH, GROUPS, HEAD_DIM)] * 2
    return [torch.randn(s, generator=g).to(dtype).requires_grad_() for s in shapes]


def sdpa_reference(query, key, value, computes_in: torch.dtype, returns: torch.dtype) -> torch.Tensor:
    """SDPA computed in `computes_in` on the given tensors, back in megatron's [s, b, heads * d] as `returns`."""
    q, k, v = (t.permute(1, 2, 0, 3).to(computes_in) for t in (query, key, value))
    with torch.autocast("cpu", enabled=False):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=HEAD_DIM**-0.5, enable_gqa=True)
    return out.to(returns).permute(2, 0, 1, 3).reshape(query.shape[0], BATCH, HEADS * HEAD_DIM)


def forward_and_grads(fn, tensors, grad_out, autocast: bool):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = fn(*tensors)
    out.backward(grad_out)
    return [out.detach()] + [t.grad for t in tensors]


@pytest.mark.parametrize(
    "tokens,dtype,autocast,computes_in,returns",
    [
        (23, torch.bfloat16, False, torch.float32, torch.bfloat16),
        (FLOAT32_ATTENTION_MAX_TOKENS, torch.float16, False, torch.float32, torch.float16),
        (FLOAT32_ATTENTION_MAX_TOKENS + 1, torch.bfloat16, False, torch.bfloat16, torch.bfloat16),
        (23, torch.float32, False, torch.float32, torch.float32),
        # --bf16 trains in autocast, where rotary embeddings hand attention float32 queries
        (23, torch.float32, True, torch.float32, torch.bfloat16),
        (FLOAT32_ATTENTION_MAX_TOKENS + 1, torch.float32, True, torch.bfloat16, torch.bfloat16),
    ],
)
def test_short_16_bit_rows_attend_in_float32_and_long_rows_in_their_dtype(
    tokens, dtype, autocast, computes_in, returns
):
    grad_out = torch.randn(tokens, BATCH, HEADS * HEAD_DIM, generator=torch.Generator().manual_seed(1)).to(returns)
    module = lambda q, k, v: SdpaCoreAttention.forward(layer(), q, k, v, None)  # noqa: E731
    reference = lambda q, k, v: sdpa_reference(q, k, v, computes_in, returns)  # noqa: E731
    got = forward_and_grads(module, inputs(tokens, dtype), grad_out, autocast)
    want = forward_and_grads(reference, inputs(tokens, dtype), grad_out, autocast)
    for name, a, b in zip(("output", "dq", "dk", "dv"), got, want):
        assert a.dtype == (returns if name == "output" else dtype), name
        assert torch.equal(a, b), f"{name}: max difference {(a.float() - b.float()).abs().max().item():.3g}"


def rms_norm(hidden: int, dtype=torch.float32) -> RMSNorm:
    norm = RMSNorm(SimpleNamespace(normalization="RMSNorm"), hidden, eps=1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 1.5, hidden))
    return norm


def test_rms_norm_backward_passes_gradcheck():
    norm = rms_norm(8, torch.float64)
    x = torch.randn(3, 5, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2), requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, weight: norm(x), (x, norm.weight))


def test_rms_norm_matches_torch_in_float32_and_keeps_16_bit_activations():
    norm, reference = rms_norm(64), torch.nn.RMSNorm(64, eps=1e-6)
    reference.load_state_dict(norm.state_dict())
    x0 = torch.randn(7, 3, 64, generator=torch.Generator().manual_seed(3)) * 4
    grad_out = torch.randn(7, 3, 64, generator=torch.Generator().manual_seed(4))
    results = []
    for module in (norm, reference):
        x = x0.clone().requires_grad_()
        out = module(x)
        out.backward(grad_out)
        results.append((out.detach(), x.grad, module.weight.grad))
    for name, a, b in zip(("output", "input grad", "weight grad"), *results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)

    x = x0.to(torch.bfloat16).requires_grad_()
    out = norm(x)
    out.backward(grad_out.to(torch.bfloat16))
    assert (out.dtype, x.grad.dtype, norm.weight.grad.dtype) == (torch.bfloat16, torch.bfloat16, torch.float32)
    torch.testing.assert_close(out.float(), results[0][0], rtol=2e-2, atol=2e-2)
