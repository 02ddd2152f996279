"""Completions per second and seconds per step of the whole RL loop (`slime.loop.train`: Ray, the Megatron
trainer, the embedded engine behind HTTP, weight sync every step; or the JAX pair with --train-backend jax
--rollout-engine jax), on a ~5M-parameter Qwen3 with 64
completions per step (8 prompts x 8 samples, up to 16 new tokens). JSON out, so the figures can be put beside
another framework's on the same machine.

    bash scripts/loopback.sh .venv/bin/python benchmarks/bench_loop.py --out bench_loop.json

The model is randomly initialised (no SFT), so responses run to the 16-token limit or a random EOS; the
reward is the quickstart's arithmetic check. The first `--warmup` steps are excluded from the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
from pathlib import Path


def build(folder: Path, hidden: int, layers: int) -> tuple[dict[str, Path], int]:
    from slime.quickstart import task

    split = task.problems(0)
    files = {"train": task.write_jsonl(split["train"], folder / "train.jsonl"), "model": folder / "model"}
    model, _ = task.build_model(files["model"], 0, hidden_size=hidden, num_layers=layers)
    return files, sum(p.numel() for p in model.parameters())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--num-layers", type=int, default=6)
    p.add_argument("--train-backend", choices=("megatron", "jax"), default=None, help="default: the backend's")
    p.add_argument("--rollout-engine", choices=("embedded", "jax"), default=None, help="default: the backend's")
    p.add_argument("--out", default="bench_loop.json")
    p.add_argument("--colocate", action="store_true", help="trainer and engine on the same devices (--colocate)")
    p.add_argument("--weight-sync", default="auto", help="the run's --weight-sync (auto: the backend's default)")
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    from slime import loop
    from slime.config import parse_config
    from slime.run_log import read_metrics

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        files, params = build(root, args.hidden_size, args.num_layers)
        n = args.prompts * args.samples
        flags = [
            "--hf-checkpoint", str(files["model"]), "--prompt-data", str(files["train"]), "--rm-type", "arithmetic",
            "--num-rollout", str(args.steps), "--rollout-batch-size", str(args.prompts), "--n-samples-per-prompt",
            str(args.samples), "--global-batch-size", str(n), "--micro-batch-size", str(n), "--rollout-max-response-len",
            str(args.max_new_tokens), "--rollout-engine-batch-size", str(n), "--lr", "1e-5", "--output-dir",
            str(root / "run"), "--no-progress", "--weight-sync", args.weight_sync,
        ]  # fmt: skip
        for flag, value in (("--train-backend", args.train_backend), ("--rollout-engine", args.rollout_engine)):
            flags += [flag, value] if value else []
        flags += ["--colocate"] if args.colocate else []
        loop.train(parse_config(flags))
        steps = [r for r in read_metrics(root / "run") if r.get("phase") == "rl"][args.warmup :]

    def median(key: str) -> float:
        return statistics.median(r[key] for r in steps)

    result = {
        "benchmark": "loop",
        "model_parameters": params,
        "completions_per_step": n,
        "train_backend": args.train_backend or "default",
        "rollout_engine": args.rollout_engine or "default",
        "max_new_tokens": args.max_new_tokens,
        "steps_measured": len(steps),
        "weight_sync": args.weight_sync,
        "colocate": args.colocate,
        "seconds_per_step": median("perf/step_time"),
        "completions_per_s": n / median("perf/step_time"),
        "generated_tokens_per_step": median("rollout/generated_tokens"),
        "split_seconds": {
            "generate": median("perf/rollout_wait"),
            "train": median("perf/train_time"),
            "weight_sync": median("perf/weight_sync_time"),
        },
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "omp_threads": os.environ["OMP_NUM_THREADS"],
        },
    }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(
        f"loop: {result['seconds_per_step']:.2f} s/step, {result['completions_per_s']:.1f} completions/s "
        f"({params / 1e6:.1f}M params, {n} completions/step, generate {result['split_seconds']['generate']:.2f} s, "
        f"train {result['split_seconds']['train']:.2f} s, sync {result['split_seconds']['weight_sync']:.3f} s)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
