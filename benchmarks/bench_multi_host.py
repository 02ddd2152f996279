"""One host against three: the same `slime train` (trainer + 2 embedded engines, broadcast weight sync, the loop
tests' tiny task) on a Ray cluster whose devices are all on one network host, and on one whose trainer and
engines are on three hosts (slime.testing.hosts), alternating rounds. Prints and writes the median per-step
time and weight-sync time of each (steps after the first, which include start-up effects).

Root, inside a private network namespace (it makes network hosts of its own):
    unshare -n sh -c 'ip link set lo up && exec python benchmarks/bench_multi_host.py --rounds 3'
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
LOOP_TESTS = HERE.parent / "test" / "registered" / "loop"
sys.path.insert(0, str(LOOP_TESTS))  # the loop tests' task builder and plugins

from loop_helpers import base_flags, build_task, rows  # noqa: E402

from slime.testing.hosts import NodeResources, TestHosts, start_ray  # noqa: E402

LAYOUTS = {  # the head (driver and rollout manager, no devices) first
    "one_host": [NodeResources(0), NodeResources(3)],
    "three_hosts": [NodeResources(0), NodeResources(1), NodeResources(1), NodeResources(1)],
}
NODE_ENV = {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(LOOP_TESTS)}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--json", default="bench_multi_host.json")
    return parser.parse_args()


def one_run(hosts: TestHosts, address: str, files: dict, out: Path, steps: int) -> dict[str, float]:
    """Median seconds per step and per weight sync of one run, its first step left out."""
    flags = {"ray-address": address, "weight-sync": "broadcast", "rollout-num-gpus": 2, "num-rollout": steps}
    command = [str(Path(sys.executable).with_name("slime")), "train", *base_flags(files, out, **flags)]
    done = hosts[0].run(command, capture_output=True, text=True, env={**os.environ, **NODE_ENV})
    if done.returncode:
        raise RuntimeError(done.stderr[-3000:])
    steady = rows(out)[1:]
    hosts_line = next((line for line in done.stderr.splitlines() if line.startswith("hosts: ")), "one host")
    return {
        "step_s": statistics.median(r["perf/step_time"] for r in steady),
        "weight_sync_s": statistics.median(r["perf/weight_sync_time"] for r in steady),
        "hosts": hosts_line,
    }


def bench_layout(name: str, files: dict, root: Path, rounds: int, steps: int) -> list[dict]:
    nodes = LAYOUTS[name]
    with TestHosts(len(nodes)) as hosts:
        address = start_ray(hosts, nodes, NODE_ENV)
        return [one_run(hosts, address, files, root / f"{name}_{i}", steps) for i in range(rounds)]


def summarize(results: dict[str, list[dict]]) -> dict[str, dict]:
    return {
        name: {
            "step_s_median": statistics.median(r["step_s"] for r in runs),
            "weight_sync_s_median": statistics.median(r["weight_sync_s"] for r in runs),
            "rounds": runs,
        }
        for name, runs in results.items()
    }


def main() -> None:
    args = parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-multi-host-"))
    files = build_task(root / "task")
    results: dict[str, list[dict]] = {name: [] for name in LAYOUTS}
    for round_index in range(args.rounds):  # alternate: the machine's speed drifts within minutes
        for name in LAYOUTS:
            results[name] += bench_layout(name, files, root / f"r{round_index}", 1, args.steps)
    summary = summarize(results)
    for name, figures in summary.items():
        print(
            f"{name:12s} step {figures['step_s_median']:.3f} s  weight sync {figures['weight_sync_s_median'] * 1e3:.1f} ms"
            f"  ({figures['rounds'][0]['hosts']})"
        )
    Path(args.json).write_text(json.dumps(summary, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
