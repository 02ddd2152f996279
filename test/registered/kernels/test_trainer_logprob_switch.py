"""The trainer's vocab-parallel log-probs/entropies (slime.training.log_probs, the full-slice formula used before
the switch) and the chunked kernel op give the same numbers and the same per-rank logits gradients, on 2 gloo
ranks with tensor parallelism 2 (megatron parallel state), for [batch, seq, vocab / TP] logits with temperature.

Tolerances: forward 2e-6 absolute; gradients 2e-6 absolute + 1e-5 relative (fp32 both; different summation order).
"""

import os
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from slime.testing.ci_register import register_cpu_ci

register_cpu_ci(est_time=20, suite="base-b-test-cpu")

WORLD, BATCH, SEQ, VOCAB = 2, 2, 7, 300
FWD = dict(atol=2e-6, rtol=1e-6)
GRAD = dict(atol=2e-6, rtol=1e-5)


def worker(rank, store_path, error_dir):
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=WORLD)
        from megatron.core import parallel_state

        from slime.backends import select_backend
        from slime.kernels import get_op
        from slime.training.log_probs import vocab_parallel_log_probs_and_entropy

        parallel_state.initialize_model_parallel(tensor_model_parallel_size=WORLD)
        tp_group = parallel_state.get_tensor_model_parallel_group()
        op = get_op("vocab_parallel_logprobs_and_entropy", backend=select_backend("cpu"))

        gen = torch.Generator().manual_seed(3)
        logits = torch.randn(BATCH, SEQ, VOCAB, generator=gen) * 4
        targets = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
        grads = torch.randn(2, BATCH, SEQ, generator=gen)
        local_vocab = VOCAB // WORLD
        local = logits[..., rank * local_vocab : (rank + 1) * local_vocab]

        for temperature in (1.0, 0.7):
            before_leaf = local.clone().requires_grad_()
            before = vocab_parallel_log_probs_and_entropy(
                before_leaf / temperature, targets, rank * local_vocab, tp_group, with_entropy=True
            )
            (before[0] * grads[0] + before[1] * grads[1]).sum().backward()

            after_leaf = local.clone().requires_grad_()
            flat = op(
                after_leaf.reshape(-1, local_vocab),
                targets.reshape(-1),
                tp_group,
                temperature=temperature,
                chunk_size=64,
            )
            after = [t.view(BATCH, SEQ) for t in flat]
            (after[0] * grads[0] + after[1] * grads[1]).sum().backward()

            torch.testing.assert_close(after[0], before[0], **FWD)
            torch.testing.assert_close(after[1], before[1], **FWD)
            torch.testing.assert_close(after_leaf.grad, before_leaf.grad, **GRAD)
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()
    except Exception:
        with open(os.path.join(error_dir, f"rank{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
        raise


def test_trainer_formula_and_kernel_op_agree_under_tensor_parallelism(tmp_path):
    try:
        mp.spawn(worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD, join=True)
    except mp.ProcessRaisedException:
        pytest.fail("a rank failed:\n" + "\n".join(p.read_text() for p in sorted(tmp_path.glob("rank*.txt"))))
