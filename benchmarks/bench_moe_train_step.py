"""MoE training on CPU: one train step of a small Qwen3-MoE at expert parallelism EP=1 (one process) and EP=2
(two gloo processes, megatron's all-to-all dispatcher), same global batch; and one MoE layer (router, dispatch,
experts, combine; forward + backward) against a dense SwiGLU MLP with the same active parameters. Writes JSON.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_moe_train_step.py --out bench_moe_train_step.json

Times are medians over --repeats steps after --warmup; peak memory is each rank's peak resident set (ru_maxrss,
whole process: Python, torch and megatron included).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "test" / "registered" / "models"))
from tiny_hf import run_ranks

MODEL = dict(hidden_size=128, intermediate_size=384, moe_intermediate_size=128, num_hidden_layers=2, num_experts=8,
             num_experts_per_tok=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32, vocab_size=1024,
             max_position_embeddings=512, norm_topk_prob=True)  # fmt: skip


def build_checkpoint(folder: Path) -> int:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**MODEL)).float()
    model.save_pretrained(str(folder))
    return sum(p.numel() for p in model.parameters())


def samples(rows: int, seq: int, response: int):
    from slime.types import Sample

    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(rows):
        tokens = torch.randint(0, MODEL["vocab_size"], (seq,), generator=g).tolist()
        s = Sample(tokens=tokens[: seq - response], index=i, advantage=1.0 if i % 2 else -1.0)
        s.append_response(tokens[seq - response :], [-1.0] * response, trainable=True)
        out.append(s)
    return out


def timed(step, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        torch.distributed.barrier()
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def train_step_rank(rank, world, port, folder, rows, seq, warmup, repeats):
    from slime.backends import select_backend
    from slime.training.actor import PolicyTrainer
    from slime.training.batch import TrainBatch
    from slime.training.config import TrainerConfig
    from slime.training.distributed import init_distributed

    torch.set_num_threads(1)
    backend = select_backend("cpu")
    layout = init_distributed(backend, rank, world, "127.0.0.1", port, expert_parallel_size=world)
    config = TrainerConfig(hf_checkpoint=folder, lr=1e-5, megatron_overrides=(("expert_model_parallel_size", world),))
    trainer = PolicyTrainer(config, backend)
    batch = TrainBatch.from_samples(samples(rows, seq, seq // 2), pad_token_id=0).split_for_dp(layout.dp_rank, world)
    seconds = timed(lambda: trainer.train_step(batch), warmup, repeats)
    layer = moe_layer_times(trainer, rows // world, seq, warmup, repeats)
    return {"step_s": seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, **layer}


def moe_layer_times(trainer, rows: int, seq: int, warmup: int, repeats: int) -> dict[str, float]:
    """The first MoE layer's MLP alone vs a dense SwiGLU of the same active size, forward + backward."""
    moe = trainer.model.decoder.layers[0].mlp
    hidden, ffn = MODEL["hidden_size"], MODEL["moe_intermediate_size"] * MODEL["num_experts_per_tok"]
    x = torch.randn(seq, rows, hidden, generator=torch.Generator().manual_seed(2), requires_grad=True)
    gate_up = torch.randn(2 * ffn, hidden, requires_grad=True)
    down = torch.randn(hidden, ffn, requires_grad=True)

    def moe_step():
        out, _ = moe(x)
        out.sum().backward()

    def dense_step():
        gate, up = torch.nn.functional.linear(x, gate_up).chunk(2, dim=-1)
        torch.nn.functional.linear(torch.nn.functional.silu(gate) * up, down).sum().backward()

    return {"moe_layer_s": timed(moe_step, warmup, repeats), "dense_layer_s": timed(dense_step, warmup, repeats)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="bench_moe_train_step.json")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    report = {"model": MODEL, "rows": args.rows, "seq": args.seq, "torch": torch.__version__, "results": {}}
    with tempfile.TemporaryDirectory() as tmp:
        report["params"] = build_checkpoint(Path(tmp))
        for ep in (1, 2):
            ranks = run_ranks(train_step_rank, ep, tmp, args.rows, args.seq, args.warmup, args.repeats, timeout=900)
            report["results"][f"ep{ep}"] = {"ranks": ranks, "step_s": max(r["step_s"] for r in ranks)}
            print(f"EP={ep}: step {report['results'][f'ep{ep}']['step_s']:.3f} s, per rank {ranks}", flush=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
