"""The TPU path's loop on JAX-CPU, side by side: the JAX trainer colocated with slime's JAX engine
(`--rollout-engine jax`) and with the real sglang-jax engine (`--rollout-engine sglang_jax`, its known-good commit),
same model, data, flags and precision (float32), in alternating rounds. Run in the TPU stack's environment:

    bash scripts/loopback.sh .venv-tpu/bin/python benchmarks/bench_sglang_jax_pair.py --out sglang_jax_pair.json

The model is a tiny Qwen3 with head_dim 128 (sglang-jax's attention needs a multiple of 128), 1 KV head and an
untied head, random (no SFT). Each round runs both engines for --steps steps; the first --warmup steps of each
run (compilation) are left out, and the figures are medians over the remaining steps, then over rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

ENGINES = ("jax", "sglang_jax")


def build(folder: Path, hidden: int, layers: int) -> dict[str, Path]:
    """The quickstart's task and tokenizer, with a Qwen3 of head_dim 128 and one KV head."""
    from slime.quickstart import task

    split = task.problems(0)
    files = {"train": task.write_jsonl(split["train"], folder / "train.jsonl"), "model": folder / "model"}
    task.build_model(files["model"], 0, hidden_size=hidden, num_layers=layers, head_dim=128)
    config_path = files["model"] / "config.json"
    config = json.loads(config_path.read_text())
    if config["num_key_value_heads"] != 1 or config["tie_word_embeddings"]:
        import torch
        from transformers import Qwen3Config, Qwen3ForCausalLM

        config.update(num_key_value_heads=1, tie_word_embeddings=False)
        torch.manual_seed(0)
        Qwen3ForCausalLM(Qwen3Config(**config)).float().save_pretrained(files["model"], safe_serialization=True)
    return files


def one_run(files: dict[str, Path], out: Path, engine: str, args: argparse.Namespace) -> dict[str, float]:
    from slime import loop
    from slime.config import parse_config
    from slime.run_log import read_metrics

    n = args.prompts * args.samples
    flags = [
        "--hf-checkpoint", str(files["model"]), "--prompt-data", str(files["train"]), "--rm-type", "arithmetic",
        "--num-rollout", str(args.steps), "--rollout-batch-size", str(args.prompts), "--n-samples-per-prompt",
        str(args.samples), "--global-batch-size", str(n), "--micro-batch-size", str(n), "--rollout-max-response-len",
        str(args.max_new_tokens), "--rollout-engine-batch-size", str(n), "--lr", "1e-5", "--output-dir", str(out),
        "--no-progress", "--train-backend", "jax", "--rollout-engine", engine, "--colocate",
    ]  # fmt: skip
    loop.train(parse_config(flags))
    steps = [r for r in read_metrics(out) if r.get("phase") == "rl"][args.warmup :]
    keys = ("perf/step_time", "perf/rollout_time", "perf/train_time", "perf/weight_sync_time")
    return {key.removeprefix("perf/"): statistics.median(r[key] for r in steps) for key in keys}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--hidden-size", type=int, default=96)
    p.add_argument("--num-layers", type=int, default=3)
    p.add_argument("--out", default="sglang_jax_pair.json")
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    rounds: list[dict[str, dict[str, float]]] = []
    with tempfile.TemporaryDirectory() as tmp:
        files = build(Path(tmp), args.hidden_size, args.num_layers)
        for i in range(args.rounds):
            rounds.append({engine: one_run(files, Path(tmp) / f"{engine}-{i}", engine, args) for engine in ENGINES})
            print(
                f"round {i + 1}: "
                + ", ".join(f"{e} {r[e]['step_time']:.3f} s/step" for e in ENGINES for r in rounds[-1:])
            )
    median = {e: {k: statistics.median(r[e][k] for r in rounds) for k in rounds[0][e]} for e in ENGINES}
    ratio = median["sglang_jax"]["step_time"] / median["jax"]["step_time"]
    for engine in ENGINES:
        figures = ", ".join(f"{k} {v:.3f} s" for k, v in median[engine].items())
        print(f"{engine:>11}: {figures}")
    print(f"sglang_jax / jax step time: {ratio:.2f}x (median of {args.rounds} rounds)")
    report = {"args": vars(args), "python": sys.version.split()[0], "machine": platform.machine(),
              "cores": os.cpu_count(), "rounds": rounds, "median": median, "step_time_ratio": ratio}  # fmt: skip
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
