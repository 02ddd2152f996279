#!/usr/bin/env python3
"""Run a registered test suite:  python test/run_suite.py --hw cpu --suite base-a-test-cpu

Each file under test/registered/ declares its suites with register_<hw>_ci(...) calls (see
slime/testing/ci_register.py); this script reads them with `ast`, partitions, and runs each file with
pytest in its own process group. The last line is always `N passed, N failed, N skipped`; a file whose tests all skipped counts as skipped,
and a nightly or accelerator suite in which no test executed fails.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from slime.testing.partition import balance, lpt_partition  # noqa: E402
from slime.testing.registry import (  # noqa: E402
    Registration,
    RegistrationError,
    collect,
    select,
    suite_stack,
    suite_stage,
)
from slime.testing.runner import (  # noqa: E402
    FileResult,
    become_subreaper,
    network_isolation_available,
    nothing_executed,
    run_file,
    summary_line,
    write_junit,
)

HARDWARE = ("cpu", "cuda", "rocm", "tpu")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hw", choices=HARDWARE, required=True)
    p.add_argument("--suite", action="append", default=[], help="suite name; repeat or comma-separate for several")
    p.add_argument(
        "--stage",
        action="append",
        default=[],
        help="add every suite of this stage (A, B, C, nightly) on --hw; repeat or comma-separate",
    )
    p.add_argument("--root", type=Path, default=REPO / "test" / "registered", help="where registered tests live")
    p.add_argument("--list", action="store_true", help="print file, est_time and shard, run nothing")
    p.add_argument("--nightly", action="store_true", help="include registrations marked nightly=True")
    p.add_argument("--auto-partition-id", type=int, default=0)
    p.add_argument("--auto-partition-size", type=int, default=1)
    p.add_argument(
        "--timeout-per-file", type=float, default=1800.0, help="seconds; the file's whole process tree is killed"
    )
    p.add_argument("--continue-on-error", action="store_true", help="run every file even after a failure")
    p.add_argument(
        "--enable-retry", action="store_true", help="retry threshold/infra failures (never code errors or timeouts)"
    )
    p.add_argument("--max-attempts", type=int, default=2)
    p.add_argument("--junit-xml", type=Path)
    p.add_argument("--durations-out", type=Path, help="write measured seconds per file as JSON")
    p.add_argument("--durations-in", type=Path, help="partition by measured seconds from an earlier --durations-out")
    p.add_argument("--coverage-map", action="store_true", help="print the suite x hardware coverage map (Markdown)")
    p.add_argument(
        "--stack-python",
        action="append",
        default=[],
        metavar="STACK=PYTHON",
        help="the interpreter of a stack's environment (tpu=.venv-tpu/bin/python) for suites named base-X-test-<stack>-stack-<hw>; "
        "without it their files are reported skipped",
    )
    p.add_argument(
        "--isolate-network",
        choices=("auto", "on", "off"),
        default="auto",
        help="run each file in a private network namespace (root + unshare); auto = when possible",
    )
    args = p.parse_args(argv)
    args.stack_python = dict(item.split("=", 1) for item in args.stack_python if "=" in item)
    args.suite = [s for value in args.suite for s in value.split(",") if s]
    args.stage = [s.upper() if s.lower() != "nightly" else "nightly" for v in args.stage for s in v.split(",") if s]
    if bad := [s for s in args.stage if s not in ("A", "B", "C", "nightly")]:
        p.error(f"--stage must be A, B, C or nightly, got {', '.join(bad)}")
    if not args.coverage_map and not args.suite and not args.stage:
        p.error("--suite or --stage is required (or --coverage-map)")
    if not 0 <= args.auto_partition_id < args.auto_partition_size:
        p.error(f"--auto-partition-id must be in [0, {args.auto_partition_size}), got {args.auto_partition_id}")
    if args.max_attempts < 1:
        p.error("--max-attempts must be >= 1")
    return args


def weights_for(selected: list[Registration], durations_in: Path | None) -> dict[str, float]:
    weights = {r.path: r.est_time for r in selected}
    if durations_in is not None:
        measured = json.loads(durations_in.read_text())
        weights.update({k: float(v) for k, v in measured.items() if k in weights})
    return weights


def coverage_map(registrations: list[Registration]) -> str:
    rows: dict[tuple[str, str], list[Registration]] = {}
    for r in registrations:
        rows.setdefault((r.suite, r.hw), []).append(r)
    stage_order = {"A": 0, "B": 1, "C": 2, "nightly": 3}
    lines = [
        "| stage | suite | hardware | files | total est_time (s) | disabled |",
        "|---|---|---|---:|---:|---:|",
    ]
    for (suite, hw), regs in sorted(
        rows.items(), key=lambda kv: (stage_order[suite_stage(kv[0][0])], kv[0][1], kv[0][0])
    ):
        lines.append(
            f"| {suite_stage(suite)} | {suite} | {hw} | {len(regs)} | {sum(r.est_time for r in regs):.0f} | "
            f"{sum(1 for r in regs if r.disabled)} |"
        )
    return "\n".join(lines)


def add_stage_suites(args: argparse.Namespace, registrations: list[Registration]) -> None:
    """A --stage adds every suite of that stage registered on --hw to args.suite."""
    for suite in sorted({r.suite for r in registrations if r.hw == args.hw and suite_stage(r.suite) in args.stage}):
        if suite not in args.suite:
            args.suite.append(suite)


def print_listing(selected: list[Registration], weights: dict[str, float], shards: list, size: int) -> None:
    shard_of = {path: i for i, shard in enumerate(shards) for path in shard}
    width = max([len(r.path) for r in selected] + [4])
    print(f"{'file':<{width}}  {'est_time':>8}  shard")
    for r in sorted(selected, key=lambda r: (shard_of[r.path], -weights[r.path], r.path)):
        flag = f"  (disabled: {r.disabled})" if r.disabled else ""
        print(f"{r.path:<{width}}  {weights[r.path]:>8.0f}  {shard_of[r.path]}{flag}")
    print(f"{len(selected)} files, {size} shards, balance {balance(weights, shards):.3f}")


def child_env(isolate: bool) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    env["SLIME_TEST_NETWORK_ISOLATED"] = "1" if isolate else "0"
    return env


def stack_interpreter(stack_python: dict[str, str], suite: str) -> tuple[str | None, str | None]:
    """(interpreter, None) for a suite's stack, or (None, why it is missing). The default stack is this one."""
    stack = suite_stack(suite)
    if stack == "default":
        return None, None
    python = stack_python.get(stack)
    if python is None or not Path(python).exists():
        return None, (
            f"the {stack} stack's environment is not built here ({python or f'no --stack-python {stack}=...'}): "
            f"it needs Python 3.12; `bash .ci/install` builds it where python3.12 is found"
        )
    return python, None


def run_files(args, mine: list[Registration], weights: dict[str, float], base: Path, isolate: bool) -> list[FileResult]:
    """Run each file in turn, printing begin/end lines; stops at the first failure unless told otherwise."""
    env = child_env(isolate)
    results: list[FileResult] = []
    for i, reg in enumerate(mine, 1):
        print(f"[{i}/{len(mine)}] begin {reg.path} (est {weights[reg.path]:.0f}s)", flush=True)
        attempts = args.max_attempts if args.enable_retry else 1
        # Each file gets its own Ray temp dir: a Ray started elsewhere on the machine (or left behind by an earlier
        # file) leaves /tmp/ray/ray_current_cluster, which makes ray.init(num_cpus=...) try to join that cluster.
        with tempfile.TemporaryDirectory(prefix="ray-", dir="/tmp", ignore_cleanup_errors=True) as ray_tmp:
            file_env = dict(env, RAY_TMPDIR=ray_tmp)
            python, missing = stack_interpreter(args.stack_python, reg.suite)
            result = run_file(
                reg, base, args.timeout_per_file, file_env, max_attempts=attempts, isolate_network=isolate,
                python=python, missing_stack=missing,
            )  # fmt: skip
        results.append(result)
        detail = ""
        if result.status == "failed":
            detail = " TIMEOUT" if result.timed_out else f" exit {result.returncode} ({result.failure_kind.value})"
            print(result.output[-8000:], flush=True)
        elif result.status == "skipped":
            detail = f" ({result.skip_reason})"
        print(
            f"[{i}/{len(mine)}] end {reg.path}: {result.status.upper()}{detail} in {result.elapsed:.1f}s "
            f"(est {weights[reg.path]:.0f}s)",
            flush=True,
        )
        if result.status == "failed" and not args.continue_on_error:
            print("stopping at the first failure (use --continue-on-error to run the rest)", flush=True)
            break
    return results


def report(args, results: list[FileResult], weights: dict[str, float], seconds: float, label: str) -> None:
    print(f"\n{'file':<60} {'status':>8} {'seconds':>8} {'est':>6} {'tries':>5}")
    for r in results:
        print(
            f"{r.registration.path:<60} {r.status:>8} {r.elapsed:>8.1f} {weights[r.registration.path]:>6.0f} {r.attempts:>5}"
        )
    print(f"total {seconds:.1f}s")
    if args.junit_xml:
        write_junit(results, args.junit_xml, label)
    if args.durations_out:
        args.durations_out.parent.mkdir(parents=True, exist_ok=True)
        measured = {r.registration.path: round(r.elapsed, 3) for r in results if r.status != "skipped"}
        args.durations_out.write_text(json.dumps(measured, indent=2, sort_keys=True) + "\n")


def must_execute(args: argparse.Namespace) -> bool:
    """Nightly and accelerator suites exist to prove something ran on their hardware: all-skipped is a failure."""
    return args.hw != "cpu" or args.nightly or any(suite_stage(s) == "nightly" for s in args.suite)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    root = args.root.resolve()
    base = REPO if root.is_relative_to(REPO) else root.parent  # paths are shown relative to this
    try:
        registrations = collect(root, base)
        if args.coverage_map:
            print(coverage_map(registrations))
            if not args.suite and not args.stage:
                return 0
        add_stage_suites(args, registrations)
        if not args.suite:
            print(f"no suites of stage {','.join(args.stage)} registered for --hw {args.hw}")
            print(summary_line([]))
            return 0
        selected = select(registrations, args.hw, args.suite, args.nightly)
    except (RegistrationError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    weights = weights_for(selected, args.durations_in)
    shards = lpt_partition(weights, args.auto_partition_size)
    if args.list:
        print_listing(selected, weights, shards, args.auto_partition_size)
        return 0
    by_path = {r.path: r for r in selected}
    mine = [by_path[p] for p in shards[args.auto_partition_id]]
    isolate = args.isolate_network == "on" or (args.isolate_network == "auto" and network_isolation_available())
    if args.isolate_network == "on" and not network_isolation_available():
        print("error: --isolate-network on needs root, `unshare` and `ip` (iproute2)", file=sys.stderr)
        return 2
    become_subreaper()
    label = ",".join(args.suite)
    print(
        f"suite {label} on {args.hw}: {len(mine)} of {len(selected)} files in shard "
        f"{args.auto_partition_id + 1}/{args.auto_partition_size}, network isolation {'on' if isolate else 'off'}",
        flush=True,
    )
    start = time.monotonic()
    results = run_files(args, mine, weights, base, isolate)
    report(args, results, weights, time.monotonic() - start, label)
    if must_execute(args) and mine and nothing_executed(results):
        print(f"error: no test executed in {label} on --hw {args.hw}: every file skipped or was disabled", flush=True)
        print(summary_line(results), flush=True)
        return 1
    print(summary_line(results), flush=True)
    return 1 if any(r.status == "failed" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
