"""scripts/gpu_check.sh: without a GPU it says so in one line and stops; its --prepare wheels fit 60 MiB (skipped
without network); the check's trainer and engine sections run on the host (--dry-run-on-cpu) and report ok."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from slime.backends.cuda.gpu_check import no_gpu_reason
from slime.testing.ci_register import register_cpu_ci, register_cuda_ci

register_cpu_ci(est_time=30, suite="base-b-test-cpu")
register_cuda_ci(est_time=240, suite="base-b-test-1-gpu")

REPO = Path(__file__).resolve().parents[3]
SCRIPT = REPO / "scripts" / "gpu_check.sh"


def run_script(*args, timeout=120):
    env = dict(os.environ, PYTHON=sys.executable, PYTHONPATH=str(REPO))
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, env=env)


def test_without_a_gpu_one_line_and_stop(tmp_path):
    if no_gpu_reason() is None:
        pytest.skip("this machine has a GPU")
    proc = run_script("--out", str(tmp_path / "r.json"), timeout=60)
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert proc.returncode == 2
    assert len(lines) == 1 and lines[0].startswith("gpu_check: no GPU on this machine"), lines
    assert not (tmp_path / "r.json").exists()


def test_prepare_fits_60_mib(tmp_path):
    proc = run_script("--prepare", str(tmp_path / "wheels"), timeout=300)
    if proc.returncode != 0 and "over the 60 MiB budget" not in proc.stderr:
        pytest.skip(f"no package index reachable: {proc.stderr.strip().splitlines()[-1:]}")
    assert proc.returncode == 0, proc.stderr
    names = sorted(p.name for p in (tmp_path / "wheels").iterdir())
    assert any(n.startswith("megatron_core-") for n in names), names
    assert sum(p.stat().st_size for p in (tmp_path / "wheels").iterdir()) <= 60 * 1024 * 1024


def test_sections_run_on_the_host(tmp_path):
    out = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, "-m", "slime.backends.cuda.gpu_check", "--dry-run-on-cpu", "--out", str(out)],
        capture_output=True, text=True, timeout=300, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    sections = report["sections"]
    assert set(sections) == {"megatron_float32", "megatron_bfloat16", "embedded_engine", "jax_trainer", "env"}
    assert sections["megatron_float32"]["log_probs_vs_hf_max_abs_diff"] < 1e-4
    assert sections["megatron_float32"]["exported_weights_vs_trainer_max_abs_diff"] < 1e-4
    assert sections["megatron_float32"]["step_changed_log_probs_by"] > 0
    assert sections["embedded_engine"]["log_probs_vs_hf_max_abs_diff"] < 1e-4
    assert sections["jax_trainer"]["ok"], sections["jax_trainer"]
    assert sections["jax_trainer"]["log_probs_vs_hf_max_abs_diff"] < 1e-4
    assert sections["env"]["report"]["selected"] == "cpu"


def test_full_check_on_the_gpu(tmp_path):
    """On a GPU runner: the real check, every section ok."""
    if (reason := no_gpu_reason()) is not None:
        pytest.skip(reason)
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run(
        [sys.executable, "-m", "slime.backends.cuda.gpu_check", "--out", str(out)],
        capture_output=True, text=True, timeout=600, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)),
    )  # fmt: skip
    report = json.loads(out.read_text())
    failed = {k: v.get("error") or v for k, v in report["sections"].items() if v.get("ok") is False}
    assert proc.returncode == 0 and not failed, failed
