"""MoE all-to-all dispatch/combine on 2 gloo processes against a single-process computation of the same MoE.

4 experts (2 per rank), top-2 routing, each expert a linear map W_e. combine(expert(dispatch(x))) must equal
sum_k w_k x W_{e_k} per token, tokens_per_expert must count every (token, choice) routed to each expert across
both ranks, and gradients for x, the router weights and the W_e must match the local computation (W_e gradients
summed over the ranks that hold copies of the data). fp32 throughout; tolerance 1e-6 absolute / 1e-5 relative.
"""

import dataclasses
import os
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from slime.testing.ci_register import register_cpu_ci

register_cpu_ci(est_time=22, suite="base-b-test-cpu")

WORLD, EXPERTS, TOP_K, TOKENS, HIDDEN = 2, 4, 2, 6, 8
TOL = dict(atol=1e-6, rtol=1e-5)


def problem(rank):
    gen = torch.Generator().manual_seed(100)
    expert_weights = torch.randn(EXPERTS, HIDDEN, HIDDEN, generator=gen) / 3
    per_rank = []
    for r in range(WORLD):
        hidden = torch.randn(TOKENS, HIDDEN, generator=gen)
        scores = torch.randn(TOKENS, EXPERTS, generator=gen)
        if r == 1:
            scores[:, 3] += 10  # rank 1 sends every token to expert 3: unbalanced traffic
        weights, indices = torch.softmax(scores, dim=-1).topk(TOP_K, dim=-1)
        per_rank.append((hidden, indices, weights))
    hidden, indices, weights = per_rank[rank]
    return expert_weights, hidden, indices, weights, per_rank


def local_moe(hidden, indices, weights, expert_weights):
    outputs = torch.einsum(
        "th,thk->tk", hidden.unsqueeze(1).expand(-1, TOP_K, -1).reshape(-1, HIDDEN), expert_weights[indices.reshape(-1)]
    ).view(TOKENS, TOP_K, HIDDEN)
    return (outputs * weights.unsqueeze(-1)).sum(1)


def run_dispatcher(dispatcher, hidden, indices, weights, expert_weights, first_expert):
    dispatched = dispatcher.dispatch(hidden, indices, weights)
    blocks = dispatched.expert_inputs.split(dispatched.tokens_per_expert.tolist())
    outputs = torch.cat([block @ expert_weights[first_expert + e] for e, block in enumerate(blocks)])
    return dispatcher.combine(outputs), dispatched.tokens_per_expert


def worker(rank, store_path, error_dir):
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=WORLD)
        from slime.kernels.moe_dispatch import AllToAllTokenDispatcher

        expert_weights, hidden, indices, weights, per_rank = problem(rank)
        dispatcher = AllToAllTokenDispatcher(EXPERTS, dist.group.WORLD)
        assert dispatcher.local_experts == 2

        w_experts = expert_weights.clone().requires_grad_()
        x, router_w = hidden.clone().requires_grad_(), weights.clone().requires_grad_()
        out, tokens_per_expert = run_dispatcher(dispatcher, x, indices, router_w, w_experts, rank * 2)
        grad_out = torch.randn(TOKENS, HIDDEN, generator=torch.Generator().manual_seed(rank))
        (out * grad_out).sum().backward()

        w_ref = expert_weights.clone().requires_grad_()
        x_ref, router_ref = hidden.clone().requires_grad_(), weights.clone().requires_grad_()
        (local_moe(x_ref, indices, router_ref, w_ref) * grad_out).sum().backward()
        torch.testing.assert_close(out, local_moe(hidden, indices, weights, expert_weights), **TOL)
        torch.testing.assert_close(x.grad, x_ref.grad, **TOL)
        torch.testing.assert_close(router_w.grad, router_ref.grad, **TOL)

        # expert e's weight gradient collects rows from both ranks but lives only on its owner
        dist.all_reduce(w_ref.grad)
        mine = slice(rank * 2, rank * 2 + 2)
        torch.testing.assert_close(w_experts.grad[mine], w_ref.grad[mine], **TOL)
        assert torch.count_nonzero(w_experts.grad[(1 - rank) * 2 : (1 - rank) * 2 + 2]) == 0

        routed = torch.bincount(torch.cat([i.reshape(-1) for _, i, _ in per_rank]), minlength=EXPERTS)
        assert tokens_per_expert.tolist() == routed[mine].tolist()
        # Both ranks leave the collectives together: a rank tearing its gloo context down while the other still
        # has an all-to-all in flight aborted with "terminate called without an active exception" on a loaded CI box.
        dist.barrier()
        dist.destroy_process_group()
    except Exception:
        with open(os.path.join(error_dir, f"rank{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
        raise


def test_two_gloo_ranks_match_the_local_moe(tmp_path):
    errors = tmp_path / "errors"
    errors.mkdir()
    try:
        mp.spawn(worker, args=(str(tmp_path / "store"), str(errors)), nprocs=WORLD, join=True)
    except mp.ProcessRaisedException:
        pytest.fail("a rank failed:\n" + "\n".join(p.read_text() for p in sorted(errors.iterdir())))


def test_single_process_dispatch_is_expert_major_and_round_trips():
    from slime.kernels.moe_dispatch import AllToAllTokenDispatcher

    expert_weights, hidden, indices, weights, _ = problem(0)
    dispatcher = AllToAllTokenDispatcher(EXPERTS)
    out, tokens_per_expert = run_dispatcher(dispatcher, hidden, indices, weights, expert_weights, 0)
    torch.testing.assert_close(out, local_moe(hidden, indices, weights, expert_weights), **TOL)
    assert tokens_per_expert.tolist() == torch.bincount(indices.reshape(-1), minlength=EXPERTS).tolist()


def test_bad_routing_names_the_shapes():
    from slime.kernels import KernelInputError
    from slime.kernels.moe_dispatch import AllToAllTokenDispatcher

    dispatcher = AllToAllTokenDispatcher(EXPERTS)
    with pytest.raises(
        KernelInputError,
        match=r"moe dispatch: topk_indices and topk_weights must both be \[T, K\] .*"
        r"hidden \(6, 8\) topk_indices \(5, 2\) topk_weights \(5, 2\)",
    ):
        dispatcher.dispatch(torch.zeros(6, 8), torch.zeros(5, 2, dtype=torch.long), torch.zeros(5, 2))
    with pytest.raises(KernelInputError, match=r"moe dispatch: expert ids must lie in \[0, 4\), got min 0 max 4"):
        dispatcher.dispatch(torch.zeros(1, 8), torch.tensor([[0, 4]]), torch.zeros(1, 2))


def fake_system(modules):
    from slime.backends import SystemView

    return SystemView(lambda m: m in modules, lambda d: None, lambda p: False, lambda p: [], {})


def test_switch_settings_are_megatron_transformer_config_fields():
    from megatron.core.transformer.transformer_config import TransformerConfig

    from slime.backends import get_backend_class
    from slime.backends.moe_dispatch import choose_moe_dispatch

    fields = {f.name: f for f in dataclasses.fields(TransformerConfig)}
    for modules, name in ((set(), "cpu"), ({"deep_ep"}, "cuda")):
        for key, value in choose_moe_dispatch(get_backend_class(name)(fake_system(modules))).megatron_config().items():
            assert key in fields
            assert value in fields[key].type.__args__  # Literal[...] choices
