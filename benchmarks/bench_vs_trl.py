"""Completions per second of TRL's GRPOTrainer beside `slime train` (sync and --async), on the same ~5M-parameter
Qwen3 checkpoint, prompts and reward, one after the other in one process tree. Needs the optional extra
(`pip install 'slime-rl[bench]'`, which pins trl); without trl it prints one line and exits 0.

    /tmp/iso.sh .venv/bin/python benchmarks/bench_vs_trl.py --steps 12 --warmup 3 --out bench_vs_trl.json

1. A Qwen3 (hidden 256, 6 layers, vocab 16: 4.7M parameters, random weights) and the quickstart's character tokenizer are built and saved
   as one HF folder; the quickstart's "abc+d=" training prompts are written as prompt data (plain text, no chat
   template on either side).
2. TRL runs --steps steps in a child process per --trl-threads count (torch threads = OMP_NUM_THREADS; "cores"
   = the cores this process may run on): 8 prompts x 8 generations per step (per_device_train_batch_size 64), one optimizer step
   per generation batch, max_completion_length 16, temperature 1, top_k 0, top_p 1, beta 0 (no reference
   model), num_iterations 1, fp32 (bf16 off, TRL's default on CPU is bf16 autocast; --bf16 turns it on for both
   sides) and no gradient checkpointing (TRL's default is on; slime's CPU trainer does not checkpoint), lr 1e-5.
   Seconds per step =
   the time between consecutive `on_step_end` callbacks (generation, reward, loss, update and TRL's logging).
3. `slime train` runs --steps steps per mode at the same shape; seconds per step = perf/step_time.
Both sides score with `digit_share` below (the same function): the share of the response's characters that
are digits. A rule on the answer would score a random model 0 everywhere, every GRPO group would have zero
advantage, and slime leaves such samples out of the update while TRL trains on them; a share differs within
almost every group, so both sides update on the whole batch. Figures are medians after --warmup steps;
completions/s = 64 / median seconds per step; the ratio printed is slime / TRL in completions/s (>= 1: slime is
faster). TRL runs once per thread count in --trl-threads (default 1 and every core: on a loaded machine one
thread per process can beat two) and the ratio is taken against its fastest. A round is TRL, then slime; --rounds
rounds (default 3) run one after another, and the ratio reported is the median of the rounds' ratios, because this
machine's speed drifts by a third within minutes (TRL's step measured 0.52 s and 0.67 s in two runs a minute
apart). The load average is recorded before and after each side, since other processes change every figure.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from slime_side import grpo_flags, median_after, run_slime

REPO = Path(__file__).resolve().parents[1]


def build(folder: Path, hidden: int, layers: int) -> tuple[Path, Path, int]:
    """The checkpoint folder (model + tokenizer), the prompt file, and the parameter count."""
    sys.path.insert(0, str(REPO))
    from slime.quickstart import task

    prompts = task.write_jsonl(task.problems(0)["train"], folder / "train.jsonl")
    model, _ = task.build_model(folder / "model", 0, hidden_size=hidden, num_layers=layers)
    return folder / "model", prompts, sum(p.numel() for p in model.parameters())


def digit_share(text: str) -> float:
    return sum(c.isdigit() for c in text) / len(text) if text else 0.0


def digit_share_reward(args, sample) -> float:
    """slime's side of the reward (--custom-rm-path bench_vs_trl.digit_share_reward)."""
    return digit_share(sample.response)


# ---- the TRL side (runs in a child process: its own threads and imports) -----------------------------------


def trl_side(checkpoint: Path, prompts: Path, out: Path, a: argparse.Namespace) -> None:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    torch.set_num_threads(a.cores)
    rows = [json.loads(line) for line in prompts.read_text().splitlines()]
    dataset = Dataset.from_list([{"prompt": r["prompt"], "label": r["label"]} for r in rows])

    def reward(prompts, completions, **_):
        return [digit_share(text) for text in completions]

    class StepClock(TrainerCallback):
        def __init__(self):
            self.ends: list[float] = []
            self.logs: list[dict] = []

        def on_train_begin(self, *args, **kwargs):
            self.ends.append(time.perf_counter())

        def on_step_end(self, *args, **kwargs):
            self.ends.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.logs.append(dict(logs or {}))

    n = a.prompts * a.samples
    config = GRPOConfig(
        output_dir=str(out.parent / "trl_run"),
        max_steps=a.steps,
        per_device_train_batch_size=n,
        gradient_accumulation_steps=1,
        num_generations=a.samples,
        max_completion_length=a.max_new,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        beta=0.0,
        num_iterations=1,
        learning_rate=a.lr,
        seed=a.seed,
        bf16=a.bf16,
        gradient_checkpointing=False,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    clock = StepClock()
    trainer = GRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32),
        reward_funcs=reward,
        args=config,
        train_dataset=dataset,
        processing_class=AutoTokenizer.from_pretrained(checkpoint),
        callbacks=[clock],
    )
    trainer.train()
    steps = [after - before for before, after in zip(clock.ends, clock.ends[1:])]
    out.write_text(json.dumps({"step_seconds": steps, "logs": clock.logs}) + "\n")


def run_trl(checkpoint: Path, prompts: Path, out: Path, a: argparse.Namespace, threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    argv = [sys.executable, __file__, "--trl-side", str(out), "--checkpoint", str(checkpoint), "--prompt-file"]
    argv += [str(prompts), "--cores", str(threads), *shape_args(a)]
    started = time.perf_counter()
    done = subprocess.run(argv, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"the TRL side failed:\n{done.stdout[-1500:]}\n{done.stderr[-3000:]}")
    record = json.loads(out.read_text())
    logs = [row for row in record["logs"] if "reward" in row][a.warmup :]
    seconds = median_after(record["step_seconds"], a.warmup)
    return {
        "seconds_per_step": seconds,
        "completions_per_s": a.prompts * a.samples / seconds,
        "steps_measured": len(record["step_seconds"][a.warmup :]),
        "step_seconds": record["step_seconds"],
        "threads": threads,
        "completion_length_mean": statistics.median(r["completions/mean_length"] for r in logs) if logs else None,
        "reward_mean_last": logs[-1]["reward"] if logs else None,
        "process_wall_s": time.perf_counter() - started,
    }


def run_trl_by_threads(checkpoint: Path, prompts: Path, root: Path, a: argparse.Namespace, cores: int) -> dict:
    """TRL once per thread count; its fastest, with every run under by_threads."""
    by_threads = {}
    for threads in sorted({int(t) for t in a.trl_threads.replace("cores", str(cores)).split(",")}):
        load = os.getloadavg()
        by_threads[threads] = run_trl(checkpoint, prompts, root / f"trl_{threads}.json", a, threads)
        by_threads[threads]["load_average_at_start"] = load
    best = min(by_threads, key=lambda t: by_threads[t]["seconds_per_step"])
    return {**by_threads[best], "version": importlib.metadata.version("trl"), "by_threads": by_threads}


def shape_args(a: argparse.Namespace) -> list[str]:
    shape = {"--steps": a.steps, "--prompts": a.prompts, "--samples": a.samples, "--max-new": a.max_new}
    args = [str(x) for flag, value in {**shape, "--lr": a.lr, "--seed": a.seed}.items() for x in (flag, value)]
    return args + (["--bf16"] if a.bf16 else [])


# ---- the slime side -------------------------------------------------------------------------------------------


# ---- driver -----------------------------------------------------------------------------------------------------


def measure_round(a: argparse.Namespace, root: Path, checkpoint: Path, prompts: Path, cores: int) -> dict:
    """One round: TRL at each thread count, then slime in each mode; ratios against this round's fastest TRL."""
    result: dict = {"trl": {}, "slime": {}, "ratio": {}}
    loads = {"before": os.getloadavg()}
    if not a.skip_trl:
        result["trl"] = run_trl_by_threads(checkpoint, prompts, root, a, cores)
    for mode in [m for m in a.modes.split(",") if m]:
        loads[f"slime_{mode}_start"] = os.getloadavg()
        out = root / f"slime_{mode}"
        reward = ["--custom-rm-path", "bench_vs_trl.digit_share_reward"]
        reward += ["--bf16", "--rollout-dtype", "bfloat16"] if a.bf16 else []  # TRL's bf16 autocasts generation too
        flags = grpo_flags(checkpoint, prompts, out, a, reward, mode)
        result["slime"][mode] = run_slime(flags, out, a.warmup, a.prompts * a.samples)
        if result["trl"]:
            ours = result["slime"][mode]["completions_per_s"]
            result["ratio"][mode] = ours / result["trl"]["completions_per_s"]
            every_core = result["trl"]["by_threads"].get(cores)
            if every_core:
                result.setdefault("ratio_vs_trl_every_core", {})[mode] = ours / every_core["completions_per_s"]
    loads["after"] = os.getloadavg()
    result["load_average"] = loads
    return result


def measure(a: argparse.Namespace, root: Path, cores: int) -> dict:
    """--rounds rounds one after another; the ratio reported is the median of the rounds' ratios (the machine's speed
    drifts by a third within minutes here, so one round can catch TRL and slime in different periods)."""
    checkpoint, prompts, params = build(root, a.hidden_size, a.num_layers)
    rounds = []
    for index in range(a.rounds):
        (root / f"round{index}").mkdir(parents=True, exist_ok=True)
        rounds.append(measure_round(a, root / f"round{index}", checkpoint, prompts, cores))
    modes = rounds[0]["ratio"].keys()
    return {
        "benchmark": "vs_trl",
        "model_parameters": params,
        "ratio": {mode: statistics.median(r["ratio"][mode] for r in rounds) for mode in modes},
        "ratio_by_round": {mode: [r["ratio"][mode] for r in rounds] for mode in modes},
        "rounds": rounds,
        "shape": {"prompts": a.prompts, "samples": a.samples, "max_new_tokens": a.max_new, "lr": a.lr},
        "precision": "bfloat16" if a.bf16 else "float32",
        "slime_flags": a.slime_flags,
        "machine": {"cores": cores, "platform": platform.platform()},
    }


def report(result: dict) -> None:
    for index, round_ in enumerate(result["rounds"]):
        trl = round_["trl"]
        for threads, row in (trl["by_threads"] if trl else {}).items():
            print(
                f"round {index + 1}: TRL {trl['version']}, {threads} thread(s): {row['seconds_per_step']:.3f} s/step, "
                f"{row['completions_per_s']:.1f} completions/s"
            )
        for mode, row in round_["slime"].items():
            ratio = f", slime/TRL {round_['ratio'][mode]:.2f}x" if mode in round_["ratio"] else ""
            print(
                f"round {index + 1}: slime {mode}: {row['seconds_per_step']:.3f} s/step, "
                f"{row['completions_per_s']:.1f} completions/s{ratio}"
            )
    for mode, ratio in result["ratio"].items():
        rounds = ", ".join(f"{r:.2f}" for r in result["ratio_by_round"][mode])
        print(f"slime {mode} / TRL, completions/s: {ratio:.2f}x (median of {len(result['rounds'])} rounds: {rounds})")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=12, help="steps per side")
    p.add_argument("--warmup", type=int, default=3, help="steps left out of the medians")
    p.add_argument(
        "--rounds", type=int, default=3, help="TRL, then slime, this many times; the median ratio is reported"
    )
    p.add_argument("--modes", default="sync,async", help="slime modes to run")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--max-new", type=int, default=16)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--num-layers", type=int, default=6)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--trl-threads", default="1,cores", help="thread counts to run TRL with; the fastest is compared")
    p.add_argument("--skip-trl", action="store_true", help="run only the slime side")
    p.add_argument(
        "--bf16",
        action="store_true",
        help="both sides in bfloat16: TRL's bf16 (autocast), slime's --bf16 trainer and bfloat16 engine",
    )
    p.add_argument(
        "--slime-flags",
        default="",
        help='more `slime train` flags, e.g. "--cores-per-node 1"; one flag alone needs "=": --slime-flags=--bf16',
    )
    p.add_argument("--work-dir", type=Path, default=None, help="keep the checkpoint and runs here (default: temp)")
    p.add_argument("--out", type=Path, default=Path("bench_vs_trl.json"))
    # the child process that runs TRL
    p.add_argument("--trl-side", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--checkpoint", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--prompt-file", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--cores", type=int, default=1, help=argparse.SUPPRESS)
    return p.parse_args()


def main() -> int:
    a = parse_args()
    if a.trl_side is not None:
        trl_side(a.checkpoint, a.prompt_file, a.trl_side, a)
        return 0
    if importlib.util.find_spec("trl") is None and not a.skip_trl:
        print("bench_vs_trl: skipped, trl is not installed (pip install 'slime-rl[bench]')")
        return 0
    cores = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory() as tmp:
        root = a.work_dir or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        result = measure(a, root, cores)
    a.out.write_text(json.dumps(result, indent=1) + "\n")
    report(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
