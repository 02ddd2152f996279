"""The nightly performance harness: run the benchmark scripts (nightly-sized), turn each one's JSON into
metric records, and keep going when one of them fails.

A record: {name, hardware, value, unit, higher_is_better, commit, date, machine}. A failure is classified:
"infra" (the script could not run: timeout, missing interpreter) or "crash" (it ran and failed, or its JSON
lacks a figure). `release/perf_gate.py` judges the records; `release/perf_report.py` draws them.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from slime.testing.runner import run_command

REPO = Path(__file__).resolve().parent.parent
ALL_HARDWARE = ("cpu", "cuda", "rocm", "tpu")

Figures = list[tuple[str, float, str, bool]]  # (metric name, value, unit, higher is better)


@dataclass(frozen=True)
class MetricRecord:
    name: str
    hardware: str
    value: float
    unit: str
    higher_is_better: bool
    commit: str
    date: str
    machine: str

    @staticmethod
    def from_json(row: dict) -> MetricRecord:
        return MetricRecord(**{k: row[k] for k in MetricRecord.__dataclass_fields__})


@dataclass(frozen=True)
class Benchmark:
    name: str
    script: str  # under benchmarks/
    args: tuple[str, ...]  # "{out}" is the JSON path
    extract: Callable[[dict], Figures]
    hardware: tuple[str, ...] = ALL_HARDWARE
    loopback: bool = False  # starts Ray: run through scripts/loopback.sh


@dataclass(frozen=True)
class Failure:
    benchmark: str
    kind: str  # "infra" | "crash"
    message: str


@dataclass
class PerfRun:
    records: list[MetricRecord] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)


# ---- extractors: one per benchmark's JSON ---------------------------------------------------------------
def _suite_collection(data: dict) -> Figures:
    return [
        ("suite_collection.collect_2000_files_s", data["collect_seconds_median"], "s", False),
        ("suite_collection.balance_8_shards", data["shards"]["8"]["balance_max_over_mean"], "max/mean", False),
    ]


def _train_step(data: dict) -> Figures:
    out: Figures = []
    for size, entry in data["results"].items():
        out += [
            (f"train_step.{size}.slime_rl_s", entry["slime_rl_s"], "s", False),
            (f"train_step.{size}.slime_sft_over_hf", entry["slime_sft_over_hf"], "x", False),
        ]
    return out


def _engine_decode(data: dict) -> Figures:
    out: Figures = []
    for row in data["results"]:
        out += [
            (f"engine_decode.{row['model']}.tok_s", row["embedded_tok_s"], "tok/s", True),
            (f"engine_decode.{row['model']}.speedup_vs_hf", row["speedup"], "x", True),
        ]
    return out


def _logprob_op(data: dict) -> Figures:
    out: Figures = []
    for row in data["results"]:
        key = f"logprob_op.{row['dtype']}.{row['mode']}"
        out += [
            (f"{key}.reference_s", row["reference"]["seconds"], "s", False),
            (f"{key}.memory_vs_naive", row["reference"]["memory_vs_naive"], "x", False),
        ]
    return out


def _weight_sync(data: dict) -> Figures:
    return [
        (f"weight_sync.{data['model']}.push_s", data["push_s"], "s", False),
        (f"weight_sync.{data['model']}.push_over_plain_copy", data["push_over_plain"], "x", False),
    ]


def _loop(data: dict) -> Figures:
    return [
        ("loop.completions_per_s", data["completions_per_s"], "completions/s", True),
        ("loop.seconds_per_step", data["seconds_per_step"], "s", False),
    ]


def _jax_engine_decode(data: dict) -> Figures:
    return [(f"jax_engine_decode.{row['model']}.tok_s", row["jax_tok_s"], "tok/s", True) for row in data["results"]]


def _jax_train_step(data: dict) -> Figures:
    out: Figures = []
    for size, entry in data["results"].items():
        out += [
            (f"jax_train_step.{size}.rl_s", entry["jax_rl_s"], "s", False),
            (f"jax_train_step.{size}.sft_s", entry["jax_sft_s"], "s", False),
        ]
    return out


def _loop_jax_pair(data: dict) -> Figures:
    return [
        ("loop_jax_pair.completions_per_s", data["completions_per_s"], "completions/s", True),
        ("loop_jax_pair.seconds_per_step", data["seconds_per_step"], "s", False),
    ]


# Where Megatron and the torch engines run (the TPU runs the JAX pair: the JAX benchmarks below).
TORCH_HARDWARE = ("cpu", "cuda", "rocm")


BENCHMARKS: tuple[Benchmark, ...] = (
    Benchmark(
        "suite_collection",
        "bench_suite_collection.py",
        ("--files", "2000", "--repeats", "3", "--out", "{out}"),
        _suite_collection,
    ),
    Benchmark(
        "train_step",
        "bench_train_step.py",
        ("--sizes", "5M", "--repeats", "3", "--out", "{out}"),
        _train_step,
        TORCH_HARDWARE,
    ),
    Benchmark(
        "engine_decode",
        "bench_engine_decode.py",
        ("--sizes", "qwen3-5m", "--repeats", "2", "--out", "{out}"),
        _engine_decode,
        TORCH_HARDWARE,
    ),
    Benchmark(
        "logprob_op",
        "bench_logprob_op.py",
        ("--rows", "1024", "--vocab", "32768", "--dtypes", "float32", "--repeats", "2", "--json-out", "{out}"),
        _logprob_op,
        TORCH_HARDWARE,
    ),
    Benchmark(
        "weight_sync",
        "bench_weight_sync.py",
        ("--size", "30M", "--repeats", "5", "--out", "{out}"),
        _weight_sync,
        ("cpu",),
    ),
    Benchmark(
        "loop", "bench_loop.py", ("--steps", "8", "--warmup", "2", "--out", "{out}"), _loop, ("cpu",), loopback=True
    ),
    # The JAX pair on its own hardware: the JAX engine's decode (batch 32 x 64 new tokens) and the JAX trainer's
    # step (5M and 30M parameters, no Megatron beside them), and the whole loop colocated on one chip (the engine
    # in the trainer's process, weights handed over device to device). Models are built locally, no download.
    Benchmark(
        "jax_engine_decode",
        "bench_jax_engine_decode.py",
        ("--jax-only", "--sizes", "qwen3-5m,qwen3-30m", "--repeats", "3", "--out", "{out}"),
        _jax_engine_decode,
        ("tpu",),
    ),
    Benchmark(
        "jax_train_step",
        "bench_jax_train_step.py",
        ("--jax-only", "--sizes", "5M", "30M", "--repeats", "5", "--out", "{out}"),
        _jax_train_step,
        ("tpu",),
    ),
    Benchmark(
        "loop_jax_pair",
        "bench_loop.py",
        ("--train-backend", "jax", "--rollout-engine", "jax", "--colocate", "--steps", "8", "--warmup", "2")
        + ("--out", "{out}"),
        _loop_jax_pair,
        ("tpu",),
        loopback=True,
    ),
)


def benchmarks_for(hardware: str, only: list[str] | None = None) -> list[Benchmark]:
    known = {b.name for b in BENCHMARKS}
    unknown = sorted(set(only or []) - known)
    if unknown:
        raise ValueError(f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return [b for b in BENCHMARKS if hardware in b.hardware and (not only or b.name in only)]


def to_records(figures: Figures, hardware: str, commit: str, date: str, machine: str) -> list[MetricRecord]:
    return [
        MetricRecord(name, hardware, float(value), unit, higher, commit, date, machine)
        for name, value, unit, higher in figures
    ]


def night(commit: str | None = None, date: str | None = None, machine: str | None = None) -> tuple[str, str, str]:
    """(commit, date, machine) for tonight's records: this checkout's commit, today's UTC date, this machine,
    unless given. Taken once per run, so that a run crossing midnight stays one night."""
    return (
        commit or current_commit(),
        date or datetime.datetime.now(datetime.UTC).date().isoformat(),
        machine or f"{platform.node()} ({os.cpu_count()} cpus)",
    )


def command_for(bench: Benchmark, out: Path, python: str = sys.executable) -> list[str]:
    argv = [python, str(REPO / "benchmarks" / bench.script), *(a.replace("{out}", str(out)) for a in bench.args)]
    already_isolated = os.environ.get("SLIME_TEST_NETWORK_ISOLATED") == "1"  # inside run_suite's namespace
    return ["bash", str(REPO / "scripts" / "loopback.sh"), *argv] if bench.loopback and not already_isolated else argv


def run_one(bench: Benchmark, out_dir: Path, timeout_s: float) -> Figures:
    """Run one benchmark script; raise Failure-shaped errors (InfraFailure / CrashFailure)."""
    out = out_dir / f"{bench.name}.json"
    log = out_dir / f"{bench.name}.log"
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    try:
        code, timed_out, output, _ = run_command(command_for(bench, out), timeout_s, env, cwd=REPO)
    except OSError as exc:
        raise InfraFailure(f"could not start: {exc}") from None
    log.write_text(output)
    if timed_out:
        raise InfraFailure(f"timed out after {timeout_s:g} s (log: {log})")
    if code != 0:
        tail = output.strip().splitlines()[-1:] or ["(no output)"]
        raise CrashFailure(f"exit {code}: {tail[0][:300]} (log: {log})")
    try:
        return bench.extract(json.loads(out.read_text()))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CrashFailure(f"its JSON has no usable figures ({type(exc).__name__}: {exc})") from None


class InfraFailure(RuntimeError):
    kind = "infra"


class CrashFailure(RuntimeError):
    kind = "crash"


def run_all(
    hardware: str,
    out_dir: Path,
    only: list[str] | None = None,
    timeout_s: float = 1800.0,
    commit: str | None = None,
    date: str | None = None,
    machine: str | None = None,
) -> PerfRun:
    out_dir.mkdir(parents=True, exist_ok=True)
    commit, date, machine = night(commit, date, machine)
    result = PerfRun()
    for bench in benchmarks_for(hardware, only):
        try:
            figures = run_one(bench, out_dir, timeout_s)
        except (InfraFailure, CrashFailure) as exc:
            result.failures.append(Failure(bench.name, exc.kind, str(exc)))
            print(f"{bench.name}: {exc.kind}: {exc}", file=sys.stderr, flush=True)
            continue
        records = to_records(figures, hardware, commit, date, machine)
        result.records += records
        for r in records:
            print(f"{r.name} = {r.value:.6g} {r.unit}", flush=True)
    return result


def current_commit() -> str:
    done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else "unknown"


def write_records(records: list[MetricRecord], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(asdict(r), sort_keys=True) + "\n" for r in records))


def read_records(path: Path) -> list[MetricRecord]:
    if not path.is_file():
        return []
    rows = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(MetricRecord.from_json(json.loads(line)))
            except (ValueError, KeyError) as exc:
                raise ValueError(f"{path}:{lineno}: not a metric record ({exc})") from None
    return rows
