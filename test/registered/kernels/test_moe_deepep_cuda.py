"""DeepEP dispatch/combine on 2 NVIDIA GPUs (NCCL group) against the all-to-all dispatcher and a local MoE.

Needs deep_ep (the slime CUDA image) and 2 GPUs. Same problem as test_moe_alltoall_gloo.py: 4 experts, top-2;
bf16 activations as in training (DeepEP's combine runs in bf16), so the tolerance is 2e-2 relative."""

import os
import traceback

import pytest
import torch

from slime.testing.ci_register import register_cuda_ci

register_cuda_ci(est_time=120, suite="base-b-test-2-gpu")

pytestmark = pytest.mark.cuda
WORLD, EXPERTS, TOP_K, TOKENS, HIDDEN = 2, 4, 2, 64, 256  # DeepEP wants hidden * 2 bytes aligned to 512
TOL = dict(atol=2e-2, rtol=2e-2)


def worker(rank, port, error_dir):
    import torch.distributed as dist

    try:
        torch.cuda.set_device(rank)
        dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
        from slime.backends.cuda.deepep_dispatch import DeepEPTokenDispatcher
        from slime.kernels.moe_dispatch import AllToAllTokenDispatcher

        gen = torch.Generator().manual_seed(7 + rank)
        experts = (
            (torch.randn(EXPERTS, HIDDEN, HIDDEN, generator=torch.Generator().manual_seed(1)) / 16).cuda().bfloat16()
        )
        hidden = torch.randn(TOKENS, HIDDEN, generator=gen).cuda().bfloat16()
        weights, indices = torch.softmax(torch.randn(TOKENS, EXPERTS, generator=gen), -1).topk(TOP_K, -1)
        weights, indices = weights.cuda(), indices.cuda()

        results = {}
        for name, dispatcher in (
            ("deepep", DeepEPTokenDispatcher(EXPERTS, dist.group.WORLD)),
            ("alltoall", AllToAllTokenDispatcher(EXPERTS, dist.group.WORLD)),
        ):
            x = hidden.clone().requires_grad_()
            dispatched = dispatcher.dispatch(x, indices, weights)
            blocks = dispatched.expert_inputs.split(dispatched.tokens_per_expert.tolist())
            outs = torch.cat([b @ experts[rank * 2 + e] for e, b in enumerate(blocks)])
            out = dispatcher.combine(outs)
            out.float().sum().backward()
            results[name] = (out.float(), x.grad.float(), dispatched.tokens_per_expert.tolist())
        local = sum(
            weights[:, k, None] * torch.bmm(hidden.unsqueeze(1), experts[indices[:, k]]).squeeze(1).float()
            for k in range(TOP_K)
        )
        torch.testing.assert_close(results["deepep"][0], local, **TOL)
        torch.testing.assert_close(results["deepep"][0], results["alltoall"][0], **TOL)
        torch.testing.assert_close(results["deepep"][1], results["alltoall"][1], **TOL)
        assert results["deepep"][2] == results["alltoall"][2]
        dist.destroy_process_group()
    except Exception:
        with open(os.path.join(error_dir, f"rank{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
        raise


def test_deepep_matches_alltoall_on_two_gpus(tmp_path):
    pytest.importorskip("deep_ep")
    if torch.cuda.device_count() < WORLD:
        pytest.skip(f"needs {WORLD} GPUs")
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    try:
        mp.spawn(worker, args=(port, str(tmp_path)), nprocs=WORLD, join=True)
    except mp.ProcessRaisedException:
        pytest.fail("a rank failed:\n" + "\n".join(p.read_text() for p in sorted(tmp_path.glob("rank*.txt"))))
