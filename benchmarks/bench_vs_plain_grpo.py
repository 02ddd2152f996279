"""Seconds per GRPO step: the plain single-process reference loop (shared/baselines/plain_grpo.py) against
`slime train`, on the same checkpoint, prompts and reward, one after the other in one process tree.

    /tmp/iso.sh .venv/bin/python benchmarks/bench_vs_plain_grpo.py --out bench_vs_plain.json

1. The plain loop builds its ~1M Qwen3 and SFTs it (`plain_grpo.py sft`), saving an HF checkpoint.
2. Its 720 training prompts ("<bos>ab+c=", the loop's own split) are written as slime prompt data; the reward is
   rm_hub's `leading_number` (the plain loop's: the leading number equals the sum).
3. `plain_grpo.py grpo` runs for --plain-budget-s (no evaluations) at the quickstart shape (32 prompts x 16
   samples, <= 5 new tokens, lr 3e-4, one optimizer step per batch); seconds per step = (generation + update)
   / steps, from its last JSON line.
4. `slime train` runs --steps steps per mode (--modes sync,async) on that checkpoint with the same shape; seconds
   per step = median of perf/step_time after --warmup steps.
The ratio printed is slime / plain (<= 1: slime is at least as fast), against the plain loop's fastest thread
count of --plain-threads (default: 1 and every core; on a loaded machine two threads per process measured
slower than one). slime uses its core budget (slime.cores). The load average is recorded before and after,
since other processes on the machine change every figure.

One difference is the plain loop's own: it skips the update for groups whose rewards are all equal (zero
advantage), so it updates on fewer samples than slime, which trains on the whole batch.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

from slime_side import grpo_flags, run_slime

REPO = Path(__file__).resolve().parents[1]
DEFAULT_PLAIN = REPO.parent / "shared" / "baselines" / "plain_grpo.py"


def json_lines(text: str) -> list[dict]:
    rows = []
    for line in text.splitlines():
        if line.startswith("{"):
            rows.append(json.loads(line))
    return rows


def run_plain(plain: Path, args: list[str], cores: int) -> list[dict]:
    env = dict(os.environ, OMP_NUM_THREADS=str(cores), TORCH_THREADS=str(cores))
    done = subprocess.run([sys.executable, str(plain), *args], env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{plain} {args[0]} failed:\n{done.stderr[-2000:]}")
    return json_lines(done.stdout)


def write_prompts(plain: Path, path: Path) -> int:
    """The plain loop's training split, as slime prompt rows ("<bos>ab+c=" -> label a+b)."""
    sys.path.insert(0, str(plain.parent))
    import plain_grpo

    train, _ = plain_grpo.make_split(0)
    with path.open("w") as f:
        for a, b in train:
            f.write(json.dumps({"prompt": f"<bos>{a}+{b}=", "label": a + b}) + "\n")
    return len(train)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--plain", type=Path, default=DEFAULT_PLAIN, help="path of plain_grpo.py")
    p.add_argument("--work-dir", type=Path, default=None, help="keep the checkpoint and runs here (default: temp)")
    p.add_argument("--plain-budget-s", type=float, default=30.0)
    p.add_argument("--steps", type=int, default=20, help="slime steps per mode")
    p.add_argument("--warmup", type=int, default=3, help="slime steps left out of the median")
    p.add_argument("--modes", default="sync,async")
    p.add_argument("--plain-threads", default="1,cores", help="thread counts to run the plain loop with; the fastest")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--max-new", type=int, default=5)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--profile", type=int, default=0, help="--profile N for the slime runs (phases.json in the run)")
    p.add_argument(
        "--slime-flags",
        default="",
        help='more `slime train` flags, e.g. "--cores-per-node 1"; one flag alone needs "=": --slime-flags=--bf16',
    )
    p.add_argument("--out", type=Path, default=Path("bench_vs_plain_grpo.json"))
    a = p.parse_args()
    if not a.plain.is_file():
        raise SystemExit(f"{a.plain}: plain_grpo.py not found; pass --plain PATH (shared/baselines beside the clone)")
    cores = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory() as tmp:
        root = a.work_dir or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        return measure(a, root, cores)


def measure(a: argparse.Namespace, root: Path, cores: int) -> int:
    load_before = os.getloadavg()
    checkpoint = root / "plain" / "ckpt"
    if not (checkpoint / "config.json").exists():
        run_plain(a.plain, ["sft", "--out", str(root / "plain"), "--lo", "0.25", "--hi", "0.45"], cores)
    prompts = root / "train.jsonl"
    write_prompts(a.plain, prompts)
    grpo = ["grpo", "--init", str(checkpoint), "--budget-s", str(a.plain_budget_s), "--prompts", str(a.prompts)]
    grpo += ["--G", str(a.samples), "--max-new", str(a.max_new), "--lr", str(a.lr), "--eval-every", "1000000"]
    by_threads = {}
    for threads in sorted({int(t) for t in a.plain_threads.replace("cores", str(cores)).split(",")}):
        done = [r for r in run_plain(a.plain, grpo + ["--seed", str(a.seed)], threads) if r.get("ev") == "done"][-1]
        by_threads[threads] = {
            "seconds_per_step": (done["gen_s"] + done["upd_s"]) / done["steps"],
            "steps": done["steps"],
            "split_seconds": {"generate": done["gen_s"] / done["steps"], "update": done["upd_s"] / done["steps"]},
        }
    best = min(by_threads, key=lambda t: by_threads[t]["seconds_per_step"])
    plain = {**by_threads[best], "threads": best, "by_threads": by_threads}
    result = {"benchmark": "vs_plain_grpo", "plain": plain, "slime": {}, "ratio": {}}
    for mode in [m for m in a.modes.split(",") if m]:
        out = root / f"slime_{mode}"
        own = ["--rm-type", "leading_number", "--adam-beta2", 0.99] + (["--profile", a.profile] if a.profile else [])
        flags = grpo_flags(checkpoint, prompts, out, a, own, mode)
        result["slime"][mode] = run_slime(flags, out, a.warmup, a.prompts * a.samples)
        result["ratio"][mode] = result["slime"][mode]["seconds_per_step"] / plain["seconds_per_step"]
    result["slime_flags"] = a.slime_flags
    result["shape"] = {"prompts": a.prompts, "samples": a.samples, "max_new_tokens": a.max_new, "lr": a.lr}
    result["machine"] = {
        "cores": cores,
        "platform": platform.platform(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
    }
    a.out.write_text(json.dumps(result, indent=1) + "\n")
    for threads, row in by_threads.items():
        print(f"plain, {threads} thread(s): {row['seconds_per_step']:.3f} s/step over {row['steps']} steps")
    for mode, row in result["slime"].items():
        print(f"slime {mode}: {row['seconds_per_step']:.3f} s/step, ratio slime/plain {result['ratio'][mode]:.2f}")
    print(f"load average before {load_before[0]:.2f}, after {result['machine']['load_average_after'][0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
