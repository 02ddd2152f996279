"""LoRA against full fine-tuning on the Megatron trainer, side by side in one process, and write JSON:
optimizer-state bytes, the bytes one weight sync sends (merged weights vs adapters alone) and the GRPO step time.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_lora.py --out benchmarks/results/lora_cpu.json

The same 30M-class Qwen3 and batch (bench_train_step's) for both; LoRA rank 8 on all linear modules. Step times
are medians of interleaved repeats (load from other processes hits both alike).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train_step import SIZES, build_checkpoint, make_samples, timed_interleaved


def optimizer_state_bytes(trainer) -> int:
    return sum(
        v.numel() * v.element_size()
        for state in trainer.optimizer.optimizer.state.values()
        for v in state.values()
        if isinstance(v, torch.Tensor)
    )


def sync_bytes(trainer) -> int:
    return sum(t.numel() * t.element_size() for bucket in trainer.hf_weight_buckets(64 << 20) for _, t in bucket)


def contenders(folder: Path, samples, rank: int) -> dict:
    from slime.backends import select_backend
    from slime.models.lora import LoraSpec
    from slime.net import free_port
    from slime.training.actor import PolicyTrainer
    from slime.training.batch import TrainBatch
    from slime.training.config import TrainerConfig
    from slime.training.distributed import init_distributed

    backend = select_backend("cpu")
    init_distributed(backend, 0, 1, "127.0.0.1", free_port(), tensor_parallel_size=1)
    batch = TrainBatch.from_samples(samples, pad_token_id=0)
    tokens = len(samples) * len(samples[0].tokens)
    lora = LoraSpec(rank, 2.0 * rank, sync="adapters")
    out = {}
    for name, spec, lr in (("full", None, 1e-5), ("lora", lora, 1e-4)):
        config = TrainerConfig(
            hf_checkpoint=str(folder), lr=lr, clip_grad=1.0, max_tokens_per_micro_batch=tokens, lora=spec
        )
        trainer = PolicyTrainer(config, backend)
        trainer.train_step(batch)  # the optimizer state exists after the first step
        out[name] = (trainer, lambda t=trainer: t.train_step(batch))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="30M", choices=list(SIZES))
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--response", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="bench_lora.json")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    with tempfile.TemporaryDirectory() as tmp:
        params = build_checkpoint(args.size, Path(tmp))
        samples = make_samples(SIZES[args.size][5], args.rows, args.seq, args.response)
        both = contenders(Path(tmp), samples, args.rank)
        times = timed_interleaved({k: step for k, (_, step) in both.items()}, args.warmup, args.repeats)
        report = {"size": args.size, "params": params, "rank": args.rank, "rows": args.rows, "seq": args.seq,
                  "threads": torch.get_num_threads(), "torch": torch.__version__}  # fmt: skip
        for name, (trainer, _) in both.items():
            report[name] = {
                "trainable_params": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
                "optimizer_state_bytes": optimizer_state_bytes(trainer),
                "weight_sync_bytes": sync_bytes(trainer),
                "step_s": statistics.median(times[name]),
            }
    full, lora = report["full"], report["lora"]
    for key in ("optimizer_state_bytes", "weight_sync_bytes", "step_s"):
        report[f"lora_over_full_{key}"] = lora[key] / full[key]
    print(
        f"{args.size} ({params / 1e6:.1f}M params), rank {args.rank}: optimizer state {lora['optimizer_state_bytes']:,} "
        f"vs {full['optimizer_state_bytes']:,} B ({report['lora_over_full_optimizer_state_bytes']:.2%}); weight sync "
        f"{lora['weight_sync_bytes']:,} vs {full['weight_sync_bytes']:,} B ({report['lora_over_full_weight_sync_bytes']:.2%}); "
        f"GRPO step {lora['step_s']:.3f} vs {full['step_s']:.3f} s ({report['lora_over_full_step_s']:.2f}x)",
        flush=True,
    )
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
