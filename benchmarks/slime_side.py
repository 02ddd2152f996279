"""The slime side of the side-by-side benchmarks (bench_vs_plain_grpo.py, bench_vs_trl.py): `slime train` at a
GRPO shape given as flags, run as a child process, summarized from its metrics.jsonl."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def grpo_flags(checkpoint: Path, prompts: Path, out: Path, a, own: list, mode: str) -> list[str]:
    """`slime train` flags for `a.steps` GRPO steps of a.prompts x a.samples completions (<= a.max_new tokens),
    one optimizer step per rollout, one engine batch for the whole rollout; `own`: the benchmark's own flags
    (its reward, optimizer settings), then --async for mode "async" and the user's --slime-flags."""
    n = a.prompts * a.samples
    flags = [
        "--hf-checkpoint", checkpoint, "--prompt-data", prompts, *own,
        "--num-rollout", a.steps, "--rollout-batch-size", a.prompts, "--n-samples-per-prompt", a.samples,
        "--global-batch-size", n, "--micro-batch-size", n, "--rollout-engine-batch-size", n,
        "--rollout-concurrency", n, "--rollout-max-response-len", a.max_new, "--rollout-temperature", 1.0,
        "--lr", a.lr, "--eps-clip", 0.2, "--rollout-shuffle", "--seed", a.seed, "--rollout-seed", a.seed,
        "--output-dir", out, "--no-progress",
    ]  # fmt: skip
    if mode == "async":
        flags.append("--async")
    return [str(f) for f in flags] + a.slime_flags.split()


def median_after(values: list[float], warmup: int) -> float:
    kept = values[warmup:]
    if not kept:
        raise SystemExit(f"no steps left after --warmup {warmup}; raise --steps")
    return statistics.median(kept)


def run_slime(flags: list[str], out: Path, warmup: int, completions: int) -> dict:
    """Run `slime train` (one thread by default; its core budget decides per phase) and summarize its RL steps:
    medians after `warmup` steps, completions/s from `completions` per step."""
    from slime.run_log import read_metrics

    paths = os.pathsep.join([str(REPO), str(REPO / "benchmarks"), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=paths)  # benchmarks/: a reward defined by a benchmark
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "slime.cli", "train", *flags], env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"slime train failed:\n{done.stdout[-1500:]}\n{done.stderr[-3000:]}")
    rows = [r for r in read_metrics(out) if r.get("phase") == "rl"]
    step_seconds = [r["perf/step_time"] for r in rows]
    seconds = median_after(step_seconds, warmup)

    def median(key: str) -> float:
        return median_after([r.get(key, 0.0) for r in rows], warmup)

    return {
        "seconds_per_step": seconds,
        "completions_per_s": completions / seconds,
        "steps_measured": len(rows[warmup:]),
        "step_seconds": step_seconds,
        "split_seconds": {
            "rollout_wait": median("perf/rollout_wait"),
            "rollout": median("perf/rollout_time"),
            "train": median("perf/train_time"),
            "sync": median("perf/weight_sync_time"),
        },
        "response_length_mean": median("rollout/response_length_mean"),
        "reward_mean_last": rows[-1].get("rollout/reward_mean") if rows else None,
        "process_wall_s": time.perf_counter() - started,
    }
