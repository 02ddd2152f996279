"""megatron-core's MoE layer with the dispatcher the CUDA backend picks when deep_ep is installed (flex over
DeepEP), expert-parallel over 2 GPUs (NCCL), against the same layer with the all-to-all dispatcher and the same
weights: outputs and input gradients. bf16 as in training (DeepEP combines in bf16): tolerance 2e-2.

Needs deep_ep (built from source; the slime CUDA image ships it) and 2 GPUs, so it lives in the 2-GPU suite."""

import os
import traceback

import pytest
import torch

from slime.testing.ci_register import register_cuda_ci

register_cuda_ci(est_time=120, suite="base-b-test-2-gpu")

pytestmark = pytest.mark.cuda
WORLD, EXPERTS, TOKENS, HIDDEN, FFN = 2, 4, 64, 256, 512  # DeepEP wants hidden * 2 bytes aligned to 512
TOL = dict(atol=2e-2, rtol=2e-2)


def build_layer(dispatch: dict):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.moe.moe_layer import MoELayer
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(
        num_layers=1, hidden_size=HIDDEN, num_attention_heads=2, ffn_hidden_size=FFN, num_moe_experts=EXPERTS,
        moe_router_topk=2, expert_model_parallel_size=WORLD, add_bias_linear=False, moe_aux_loss_coeff=0.0,
        params_dtype=torch.bfloat16, bf16=True, moe_router_dtype="fp32", **dispatch,
    )  # fmt: skip
    spec = get_gpt_layer_local_spec(num_experts=EXPERTS, moe_grouped_gemm=False)
    return MoELayer(config, spec.submodules.mlp.submodules).cuda()


def run(layer, x, grad_out):
    x = x.clone().requires_grad_()
    out, _ = layer(x)
    (out.float() * grad_out).sum().backward()
    return out.float(), x.grad.float()


def worker(rank, port, error_dir):
    import torch.distributed as dist

    try:
        torch.cuda.set_device(rank)
        dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
        from megatron.core import parallel_state
        from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

        from slime.backends import select_backend

        parallel_state.initialize_model_parallel(tensor_model_parallel_size=1, expert_model_parallel_size=WORLD)
        model_parallel_cuda_manual_seed(1)
        chosen = select_backend("cuda").moe_dispatch_config(expert_comm_ranks=WORLD)
        assert chosen["moe_token_dispatcher_type"] == "flex", chosen
        flex = build_layer(chosen)
        alltoall = build_layer({"moe_token_dispatcher_type": "alltoall"})
        alltoall.load_state_dict(flex.state_dict())
        gen = torch.Generator().manual_seed(rank)
        x = torch.randn(TOKENS, 1, HIDDEN, generator=gen).to("cuda", torch.bfloat16)
        grad_out = torch.randn(TOKENS, 1, HIDDEN, generator=gen).cuda()
        out_flex, grad_flex = run(flex, x, grad_out)
        out_a2a, grad_a2a = run(alltoall, x, grad_out)
        torch.testing.assert_close(out_flex, out_a2a, **TOL)
        torch.testing.assert_close(grad_flex, grad_a2a, **TOL)
        dist.destroy_process_group()
    except Exception:
        with open(os.path.join(error_dir, f"rank{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
        raise


def test_deepep_flex_dispatcher_matches_alltoall_on_two_gpus(tmp_path):
    import torch.multiprocessing as mp

    if torch.cuda.device_count() < WORLD:
        pytest.skip(f"needs {WORLD} GPUs, found {torch.cuda.device_count()}")
    try:
        import deep_ep  # noqa: F401
    except ImportError:
        pytest.skip("deep_ep is not installed (built from source in the slime CUDA image)")
    from slime.training.distributed import free_port

    try:
        mp.spawn(worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    except mp.ProcessRaisedException:
        pytest.fail("a rank failed:\n" + "\n".join(p.read_text() for p in sorted(tmp_path.glob("rank*.txt"))))
