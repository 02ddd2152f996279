"""Vocab-parallel log-prob/entropy on 2 gloo processes: each rank holds half the vocabulary; outputs must equal the
single-process op on the whole logits, and each rank's gradient must equal that slice of the whole gradient.
Covers the torch reference, the Triton kernels (TRITON_INTERPRET=1 in the workers) and the fused linear form.

Tolerances as in the single-process tests: forward 2e-6 absolute; gradients 2e-6 absolute + 1e-5 relative.
"""

import os
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from slime.testing.ci_register import register_cpu_ci

register_cpu_ci(est_time=17, suite="base-b-test-cpu")

WORLD = 2
ROWS, VOCAB, HIDDEN = 5, 240, 16
FWD = dict(atol=2e-6, rtol=1e-6)
GRAD = dict(atol=2e-6, rtol=1e-5)


def full_problem():
    gen = torch.Generator().manual_seed(11)
    logits = torch.randn(ROWS, VOCAB, generator=gen) * 3
    tokens = torch.tensor([0, 119, 120, 239, 57])  # both sides of the split, and its edges
    grads = torch.randn(2, ROWS, generator=gen)
    hidden = torch.randn(ROWS, HIDDEN, generator=gen)
    weight = torch.randn(VOCAB, HIDDEN, generator=gen) / 2
    return logits, tokens, grads, hidden, weight


def check_logits_form(op, rank, group, temperature):
    from slime.kernels import logprobs_and_entropy

    logits, tokens, grads, _, _ = full_problem()
    local_vocab = VOCAB // WORLD
    local = logits[:, rank * local_vocab : (rank + 1) * local_vocab].clone().requires_grad_()
    log_probs, entropy = op(local, tokens, group, temperature=temperature, chunk_size=32)
    (log_probs * grads[0] + entropy * grads[1]).sum().backward()

    whole = logits.clone().requires_grad_()
    want_lp, want_ent = logprobs_and_entropy(whole, tokens, temperature=temperature, chunk_size=64)
    (want_lp * grads[0] + want_ent * grads[1]).sum().backward()
    torch.testing.assert_close(log_probs, want_lp, **FWD)
    torch.testing.assert_close(entropy, want_ent, **FWD)
    torch.testing.assert_close(local.grad, whole.grad[:, rank * local_vocab : (rank + 1) * local_vocab], **GRAD)


def check_linear_form(rank, group):
    from slime.kernels import linear_logprobs_and_entropy, naive_logprobs_and_entropy

    _, tokens, grads, hidden, weight = full_problem()
    local_vocab = VOCAB // WORLD
    h = hidden.clone().requires_grad_()
    w_local = weight[rank * local_vocab : (rank + 1) * local_vocab].clone().requires_grad_()
    log_probs, entropy = linear_logprobs_and_entropy(h, w_local, tokens, temperature=0.8, chunk_size=50, group=group)
    (log_probs * grads[0] + entropy * grads[1]).sum().backward()

    h_ref, w_ref = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    want_lp, want_ent = naive_logprobs_and_entropy(h_ref @ w_ref.t(), tokens, temperature=0.8)
    (want_lp * grads[0] + want_ent * grads[1]).sum().backward()
    torch.testing.assert_close(log_probs, want_lp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(entropy, want_ent, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h.grad, h_ref.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        w_local.grad, w_ref.grad[rank * local_vocab : (rank + 1) * local_vocab], atol=1e-5, rtol=1e-5
    )


def worker(rank: int, store_path: str, error_dir: str) -> None:
    os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton in this fresh process
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=WORLD)
        from slime.kernels import get_op

        group = dist.group.WORLD
        for impl in ("torch", "triton"):
            op = get_op("vocab_parallel_logprobs_and_entropy", impl=impl)
            for temperature in (1.0, 0.7):
                check_logits_form(op, rank, group, temperature)
        check_linear_form(rank, group)
        dist.barrier()
        dist.destroy_process_group()
    except Exception:
        with open(os.path.join(error_dir, f"rank{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
        raise


def test_two_gloo_ranks_match_the_single_process_op(tmp_path):
    errors = tmp_path / "errors"
    errors.mkdir()
    try:
        mp.spawn(worker, args=(str(tmp_path / "store"), str(errors)), nprocs=WORLD, join=True)
    except mp.ProcessRaisedException:
        reports = "\n".join(p.read_text() for p in sorted(errors.iterdir()))
        pytest.fail(f"a rank failed:\n{reports}")


def test_without_a_group_it_is_the_single_process_op():
    from slime.kernels import logprobs_and_entropy, vocab_parallel_logprobs_and_entropy

    logits, tokens, _, _, _ = full_problem()
    got = vocab_parallel_logprobs_and_entropy(logits, tokens, None, chunk_size=32)
    want = logprobs_and_entropy(logits, tokens, chunk_size=32)
    assert all(torch.equal(g, w) for g, w in zip(got, want))
