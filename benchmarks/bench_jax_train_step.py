"""Time one training step (forward + backward + AdamW) of the JAX trainer and of the Megatron trainer on the same
tiny Qwen3 and batch, side by side in one run, and write JSON.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_jax_train_step.py --out bench_jax_train_step.json

Sizes and batch (8 x 128 tokens, loss on the last 64 of each row) are those of bench_train_step.py. Both
trainers run single-threaded by default (XLA's CPU thread pool is limited to one thread like torch's), and
the contenders alternate step by step so that load from other processes hits them alike. "sft" is the NLL
step, "rl" the GRPO step (ratio, clipping, entropy).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path


def _limit_threads(threads: int, jax_only: bool) -> None:
    """Before jax is imported: one intra-op thread for XLA when torch gets one (a fair comparison). Beside
    Megatron, JAX runs on the host as Megatron does; alone (--jax-only) it runs on JAX's default device."""
    if threads == 1:
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = f"{flags} --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    if not jax_only:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")


def jax_steps(folder: Path, samples, lr: float) -> dict:
    import jax

    from slime.training.batch import TrainBatch
    from slime.training.config import TrainerConfig
    from slime.training.jax.trainer import JaxPolicyTrainer

    config = TrainerConfig(
        hf_checkpoint=str(folder), lr=lr, clip_grad=1.0,
        max_tokens_per_micro_batch=len(samples) * len(samples[0].tokens),
    )  # fmt: skip
    trainer = JaxPolicyTrainer(config, jax.devices()[:1])
    batch = TrainBatch.from_samples(samples, pad_token_id=0)
    return {"jax_sft": lambda: trainer.sft_step(batch), "jax_rl": lambda: trainer.train_step(batch)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["5M", "30M"])
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--response", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="bench_jax_train_step.json")
    parser.add_argument("--jax-only", action="store_true", help="no Megatron run (TPU: Megatron does not run there)")
    args = parser.parse_args()
    threads = int(os.environ.setdefault("OMP_NUM_THREADS", "1"))
    _limit_threads(threads, args.jax_only)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import jax
    import torch
    from bench_train_step import SIZES, build_checkpoint, make_samples, slime_steps, timed_interleaved

    from slime.training.distributed import destroy_distributed

    torch.set_num_threads(threads)
    report = {"rows": args.rows, "seq": args.seq, "threads": threads, "torch": torch.__version__,
              "jax": jax.__version__, "load_avg_1m_start": os.getloadavg()[0], "results": {}}  # fmt: skip
    for size in args.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            params = build_checkpoint(size, folder)
            samples = make_samples(SIZES[size][5], args.rows, args.seq, args.response)
            megatron = {}
            if not args.jax_only:
                megatron = {f"megatron_{k[len('slime_') :]}": v for k, v in slime_steps(folder, samples, 1e-5).items()}
            steps = {**megatron, **jax_steps(folder, samples, 1e-5)}
            times = timed_interleaved(steps, args.warmup, args.repeats)
            if megatron:
                destroy_distributed()
        entry = {"params": params, "jax_device": jax.devices()[0].platform}
        entry.update({f"{k}_s": statistics.median(v) for k, v in times.items()})
        line = f"{size:>4} ({params / 1e6:.1f}M): jax sft {entry['jax_sft_s']:.3f} s rl {entry['jax_rl_s']:.3f} s"
        if megatron:
            for kind in ("sft", "rl"):
                entry[f"jax_over_megatron_{kind}"] = entry[f"jax_{kind}_s"] / entry[f"megatron_{kind}_s"]
            line += (
                f" | megatron sft {entry['megatron_sft_s']:.3f} s rl {entry['megatron_rl_s']:.3f} s "
                f"(jax/megatron: sft {entry['jax_over_megatron_sft']:.2f}x, rl {entry['jax_over_megatron_rl']:.2f}x)"
            )
        report["results"][size] = entry
        print(line, flush=True)
    report["load_avg_1m_end"] = os.getloadavg()[0]
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
