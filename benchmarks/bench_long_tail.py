"""Sync, --async and --fully-async side by side on a long-tailed task: the quickstart's arithmetic task and model
after its SFT warm-up (done once, shared), ~5% of responses 128 tokens long and the rest <= 5
(long_tail_plugins.py), same data, reward, seed and flags; rounds alternate the modes (this machine's speed
drifts). Prints and writes per mode the median completions/s over steps after the first, the held-out accuracy
at each evaluation with the wall time it was reached, staleness, and the ratio --fully-async / --async.

    python benchmarks/bench_long_tail.py --rounds 3 --json benchmarks/results/long_tail.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from slime.quickstart import run as quickstart
from slime.quickstart import task

HERE = Path(__file__).resolve().parent
MODES = {"sync": {"--async": False}, "async": {}, "fully_async": {"--async": False, "--fully-async": None}}
PLUGIN = {"--custom-generate-function-path": "long_tail_plugins.generate"}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=30, help="GRPO steps per run")
    p.add_argument("--rollout-batch-size", type=int, default=16)
    p.add_argument("--n-samples-per-prompt", type=int, default=8)
    p.add_argument("--eval-interval", type=int, default=10)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", default="long_tail.json")
    return p.parse_args()


def quickstart_args(args, folder: Path) -> argparse.Namespace:
    argv = ["--output-dir", str(folder), "--seed", str(args.seed), "--num-rollout", str(args.steps),
            "--rollout-batch-size", str(args.rollout_batch_size), "--n-samples-per-prompt",
            str(args.n_samples_per_prompt), "--eval-interval", str(args.eval_interval), "--eval-size", "200"]  # fmt: skip
    return quickstart.parse_args(argv)


def slime_train(flags: list[str]) -> float:
    """Run `slime train`; returns its wall time."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "slime.cli", "train", *flags], env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(done.stderr[-3000:])
    return time.perf_counter() - start


def warm_up(args, root: Path) -> tuple[argparse.Namespace, dict, Path]:
    """The quickstart's task and model, and its SFT warm-up once: the warmed-up model is every mode's start."""
    qs = quickstart_args(args, root)
    split = task.problems(args.seed, val_size=quickstart.VAL_SIZE)
    files = {
        "train": task.write_jsonl(split["train"], root / "data" / "train.jsonl"),
        "test": task.write_jsonl(split["test"][: qs.eval_size], root / "data" / "test.jsonl"),
        "sft": task.write_jsonl(split["sft"], root / "data" / "sft.jsonl", with_response=True),
        "val": task.write_jsonl(split["val"], root / "data" / "val.jsonl"),
    }
    task.build_model(root / "model", args.seed, hidden_size=qs.hidden_size, num_layers=qs.num_layers)
    config_path = root / "model" / "config.json"  # room for the long responses (rotary positions: no new weights)
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "max_position_embeddings": 256}))
    overrides = {"--num-rollout": 1, "--save-hf": root / "sft_model", "--output-dir": root / "sft_run"}
    slime_train(quickstart.train_flags(qs, root, files, overrides=overrides))
    return qs, files, root / "sft_model"


def one_run(qs, files: dict, model: Path, root: Path, mode: str, tag: str) -> dict:
    out = root / f"{mode}_{tag}"
    overrides = {"--hf-checkpoint": model, "--sft-warmup-steps": 0, "--output-dir": out, **PLUGIN, **MODES[mode]}
    flags = quickstart.train_flags(qs, root, files, overrides=overrides)
    wall = slime_train(flags)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r.get("phase") == "rl"]
    key = f"eval/{quickstart.EVAL_NAME}/reward_mean"
    evals = [r for r in rows if key in r]
    return {
        "wall_s": wall,
        "completions_per_s": statistics.median(r["perf/completions_per_s"] for r in steps[1:]),
        # (step, held-out accuracy, seconds of RL steps until then): accuracy against wall time
        "heldout": [
            (r["step"], r[key], sum(s["perf/step_time"] for s in steps if s["step"] < r["step"])) for r in evals
        ],
        "staleness_max": max((r.get("rollout/staleness_max", 0.0) for r in steps), default=0.0),
    }


def main() -> None:
    args = parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-long-tail-"))
    qs, files, model = warm_up(args, root)
    results: dict[str, list[dict]] = {mode: [] for mode in MODES}
    for round_index in range(args.rounds):
        for mode in MODES:
            results[mode].append(one_run(qs, files, model, root, mode, str(round_index)))
            print(mode, round_index, json.dumps(results[mode][-1]), flush=True)
    summary = {mode: statistics.median(r["completions_per_s"] for r in runs) for mode, runs in results.items()}
    ratios = [f["completions_per_s"] / a["completions_per_s"] for f, a in zip(results["fully_async"], results["async"])]
    report = {"completions_per_s_median": summary, "ratio_fully_async_vs_async": statistics.median(ratios),
              "ratios": ratios, "rounds": results, "args": vars(args)}  # fmt: skip
    for mode, value in summary.items():
        print(f"{mode:12s} {value:8.1f} completions/s")
    print(
        f"fully-async / async: {report['ratio_fully_async_vs_async']:.2f}x (rounds {', '.join(f'{r:.2f}' for r in ratios)})"
    )
    Path(args.json).write_text(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
