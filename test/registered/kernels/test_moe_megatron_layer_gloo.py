"""A real megatron-core MoE layer with the dispatcher the backend picks (all-to-all on CPU), expert-parallel
over 2 gloo processes, against the same MoE computed locally from the layer's own router output and gathered
expert weights: outputs and input gradients. fp32; tolerance 1e-5 absolute / 1e-5 relative.

Runs through the CPU compatibility layer's MoE redirects (slime/backends/cpu/megatron_compat.py).
"""

import os
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from slime.testing.ci_register import register_cpu_ci

register_cpu_ci(est_time=15, suite="base-b-test-cpu")

WORLD, EXPERTS, TOKENS, HIDDEN, FFN = 2, 4, 6, 16, 32
TOL = dict(atol=1e-5, rtol=1e-5)


def build_layer():
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.moe.moe_layer import MoELayer
    from megatron.core.transformer.transformer_config import TransformerConfig

    from slime.backends import select_backend

    config = TransformerConfig(
        num_layers=1,
        hidden_size=HIDDEN,
        num_attention_heads=2,
        ffn_hidden_size=FFN,
        num_moe_experts=EXPERTS,
        moe_router_topk=2,
        expert_model_parallel_size=WORLD,
        add_bias_linear=False,
        moe_aux_loss_coeff=0.0,
        use_cpu_initialization=True,
        **select_backend("cpu").moe_dispatch_config(),
    )
    assert config.moe_token_dispatcher_type == "alltoall"
    spec = get_gpt_layer_local_spec(num_experts=EXPERTS, moe_grouped_gemm=False)
    return MoELayer(config, spec.submodules.mlp.submodules)


def gathered_expert_weights(layer):
    fc1 = torch.stack([e.linear_fc1.weight.detach() for e in layer.experts.local_experts])
    fc2 = torch.stack([e.linear_fc2.weight.detach() for e in layer.experts.local_experts])
    parts1, parts2 = [torch.empty_like(fc1) for _ in range(WORLD)], [torch.empty_like(fc2) for _ in range(WORLD)]
    dist.all_gather(parts1, fc1)
    dist.all_gather(parts2, fc2)
    return torch.cat(parts1), torch.cat(parts2)


def worker(rank, store_path, error_dir):
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=WORLD)
        from slime.backends import select_backend

        select_backend("cpu").prepare_megatron()
        from megatron.core import parallel_state
        from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

        parallel_state.initialize_model_parallel(tensor_model_parallel_size=1, expert_model_parallel_size=WORLD)
        model_parallel_cuda_manual_seed(1)
        layer = build_layer()
        fc1, fc2 = gathered_expert_weights(layer)

        x = torch.randn(TOKENS, 1, HIDDEN, generator=torch.Generator().manual_seed(rank)).requires_grad_()
        out, _ = layer(x)
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(10 + rank))
        (out * grad_out).sum().backward()

        x_ref = x.detach().clone().requires_grad_()
        flat = x_ref.view(TOKENS, HIDDEN)
        probs, routing_map = layer.router(x_ref)  # differentiable: x's gradient also flows through the router
        probs = probs.view(TOKENS, EXPERTS)
        per_expert = torch.stack([torch.nn.functional.gelu(flat @ fc1[e].t()) @ fc2[e].t() for e in range(EXPERTS)], 1)
        ref = (per_expert * probs.unsqueeze(-1)).sum(1).view(TOKENS, 1, HIDDEN)
        (ref * grad_out).sum().backward()
        assert int(routing_map.sum()) == TOKENS * 2
        torch.testing.assert_close(out, ref, **TOL)
        torch.testing.assert_close(x.grad, x_ref.grad, **TOL)
        dist.destroy_process_group()
    except Exception:
        with open(os.path.join(error_dir, f"rank{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
        raise


def test_megatron_moe_layer_alltoall_on_two_gloo_ranks(tmp_path):
    try:
        mp.spawn(worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD, join=True)
    except mp.ProcessRaisedException:
        pytest.fail("a rank failed:\n" + "\n".join(p.read_text() for p in sorted(tmp_path.glob("rank*.txt"))))
