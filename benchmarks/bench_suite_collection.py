#!/usr/bin/env python3
"""Issue 2 benchmark: collect 2,000 registered test files with `ast` (target < 1 s), and the LPT shard balance
for a realistic, long-tailed est_time distribution. Prints the figures and writes JSON.

  .venv/bin/python benchmarks/bench_suite_collection.py [--files 2000] [--out benchmarks/results/suite_collection.json]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from slime.testing.partition import balance, lpt_partition, shard_loads  # noqa: E402
from slime.testing.registry import collect  # noqa: E402

SUITES = ("base-a-test-cpu", "base-b-test-cpu", "base-c-test-cpu")


def realistic_est_times(count: int, rng: random.Random) -> list[float]:
    """Most files take seconds, a tail of end-to-end files takes minutes: lognormal, median ~20 s, clipped."""
    return [round(min(1800.0, max(1.0, rng.lognormvariate(3.0, 1.1)))) for _ in range(count)]


def write_tree(root: Path, est_times: list[float], rng: random.Random) -> None:
    for i, est in enumerate(est_times):
        area = root / f"area{i % 40:02d}"
        area.mkdir(parents=True, exist_ok=True)
        body = "\n".join(f"def test_case_{k}():\n    assert {k} + 1 == {k + 1}\n" for k in range(8))
        (area / f"test_file_{i:04d}.py").write_text(
            '"""A generated test file of realistic size."""\n\nimport pytest\n\n'
            "from slime.testing.ci_register import register_cpu_ci\n\n"
            f'register_cpu_ci(est_time={est}, suite="{rng.choice(SUITES)}")\n\n{body}'
        )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--files", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "suite_collection.json")
    args = p.parse_args()

    rng = random.Random(7)
    est_times = realistic_est_times(args.files, rng)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "registered"
        write_tree(root, est_times, rng)
        timings = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            registrations = collect(root)
            timings.append(time.perf_counter() - start)
    assert len(registrations) == args.files

    weights = {r.path: r.est_time for r in registrations}
    shards = {}
    for n in (2, 4, 8, 16, 32):
        start = time.perf_counter()
        parts = lpt_partition(weights, n)
        elapsed = time.perf_counter() - start
        loads = shard_loads(weights, parts)
        lower_bound = max(sum(loads) / n, max(weights.values()))  # no partition can beat this makespan
        shards[n] = {
            "balance_max_over_mean": round(balance(weights, parts), 4),
            "makespan_s": round(max(loads), 1),
            "makespan_over_lower_bound": round(max(loads) / lower_bound, 4),
            "partition_ms": round(elapsed * 1000, 2),
        }
    result = {
        "files": args.files,
        "collect_seconds_median": round(statistics.median(timings), 4),
        "collect_seconds_all": [round(t, 4) for t in timings],
        "est_time_total_s": sum(est_times),
        "est_time_median_s": statistics.median(est_times),
        "est_time_max_s": max(est_times),
        "shards": shards,
    }
    print(f"collect {args.files} files: median {result['collect_seconds_median']:.3f} s over {args.repeats} runs")
    print(
        f"est_time: total {result['est_time_total_s']:.0f} s, median {result['est_time_median_s']:.0f} s, max {result['est_time_max_s']:.0f} s"
    )
    for n, row in shards.items():
        print(
            f"{n:>3} shards: balance {row['balance_max_over_mean']:.3f}  makespan {row['makespan_s']:.0f} s "
            f"({row['makespan_over_lower_bound']:.3f} x lower bound)  partition {row['partition_ms']:.1f} ms"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
