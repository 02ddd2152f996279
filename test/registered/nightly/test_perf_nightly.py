"""Nightly performance: every benchmark for this machine's hardware through the harness, judged against the
committed baselines and the history (release/perf_gate.py), with the report written.

SLIME_NIGHTLY_OUT (default: a temporary folder) receives the benchmark JSON, records, summary.md and plots;
SLIME_NIGHTLY_HISTORY names the history JSONL the workflow carries from night to night.
"""

import os
import subprocess
import sys
from pathlib import Path

from slime.testing.ci_register import register_cpu_ci, register_cuda_ci, register_rocm_ci, register_tpu_ci

register_cpu_ci(est_time=900, suite="nightly-perf-cpu", nightly=True)
register_cuda_ci(est_time=1800, suite="nightly-perf-1-gpu", nightly=True)
register_rocm_ci(est_time=1800, suite="nightly-perf-1-gpu-amd", nightly=True)
register_tpu_ci(est_time=1800, suite="nightly-perf-tpu", nightly=True)

REPO = Path(__file__).resolve().parents[3]


def test_benchmarks_pass_the_gate(tmp_path):
    from slime.backends import select_backend

    hardware = select_backend("auto").name
    out = Path(os.environ.get("SLIME_NIGHTLY_OUT") or tmp_path) / "perf"
    history = os.environ.get("SLIME_NIGHTLY_HISTORY") or str(out / "history.jsonl")
    done = subprocess.run(
        [sys.executable, "-m", "release", "perf", "--hardware", hardware, "--out", str(out), "--history", history],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    print(done.stdout)
    summary = out / "report" / "summary.md"
    assert done.returncode == 0, (
        f"gate exit code {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-2000:]}\n"
        + (summary.read_text() if summary.is_file() else "")
    )
