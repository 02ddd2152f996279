"""scripts/gpu_check.sh: --dry-run lists every section with its needs; without a GPU a real run says so in one line
and stops; the decisions (section status, exit code, a CPU-only JAX beside a GPU, a broken CUDA environment) as pure
functions; its --prepare wheels fit 60 MiB (skipped without network); the sections with a CPU variant run on the
host (--dry-run-on-cpu): the IPC one through SGLang's own deserialiser on shared CPU memory, `slime train` on Ray."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from slime.backends.cuda.gpu_check import no_gpu_reason
from slime.backends.cuda.gpu_check import verdicts as V
from slime.backends.cuda.gpu_check.cli import SECTIONS
from slime.backends.cuda.gpu_check.needs import SGLANG, SGLANG_IMPORT_MODULES, carried, modules_need
from slime.testing.ci_register import register_cpu_ci, register_cuda_ci

register_cpu_ci(est_time=90, suite="base-b-test-cpu")
register_cuda_ci(est_time=240, suite="base-b-test-1-gpu")

REPO = Path(__file__).resolve().parents[3]
SCRIPT = REPO / "scripts" / "gpu_check.sh"
ENV = dict(os.environ, PYTHON=sys.executable, PYTHONPATH=str(REPO))


def run_script(*args, timeout=120):
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, env=ENV)


def run_module(*args, timeout=300):
    cmd = [sys.executable, "-m", "slime.backends.cuda.gpu_check", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO, env=ENV)


def test_dry_run_lists_every_section_and_what_it_needs():
    proc = run_script("--dry-run", timeout=60)
    assert proc.returncode == 0, proc.stderr
    blocks = proc.stdout.split("\n\n")
    assert blocks[0].startswith(f"gpu_check --dry-run: {len(SECTIONS)} sections")
    assert blocks[-1].startswith("gpu_check --dry-run: ") and "would run here" in blocks[-1]
    listed = {block.split()[0]: block for block in blocks[1:-1]}
    assert list(listed) == [s.name for s in SECTIONS]
    for section in SECTIONS:
        block = listed[section.name]
        assert f"~{section.budget_s:>3} s" in block and f"proves: {section.proves}" in block
        for need in section.needs:
            assert f"needs {need.label}: " in block
        if no_gpu_reason() is not None:  # this machine: every section needs the GPU
            assert "would SKIP" in block and "an NVIDIA GPU and a CUDA build of torch: NOT MET" in block
    assert sum(s.budget_s for s in SECTIONS) <= 220  # the Python side's plan; the script stops it at 230 s


def test_dry_run_counts_carried_wheels(tmp_path):
    need = modules_need("a carried package", ("not_installed_pkg_xyz",))
    assert need.check(None) == "missing not_installed_pkg_xyz"
    (tmp_path / "not_installed_pkg_xyz-1.0-py3-none-any.whl").write_bytes(b"")
    assert need.check(tmp_path) is None


def test_without_a_gpu_one_line_and_stop(tmp_path):
    if no_gpu_reason() is None:
        pytest.skip("this machine has a GPU")
    proc = run_script("--out", str(tmp_path / "r.json"), timeout=60)
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert proc.returncode == V.EXIT_NO_GPU
    assert len(lines) == 1 and lines[0].startswith("gpu_check: no GPU on this machine"), lines
    assert not (tmp_path / "r.json").exists()


def test_section_status_and_exit_code():
    assert V.section_status({"ok": True}) == V.OK
    assert V.section_status({"ok": False}) == V.FAIL
    assert V.section_status({"ok": None}) == V.FAIL  # undecided is not a pass
    assert V.section_status({}) == V.FAIL
    assert V.section_status({"status": "skip", "reason": "no Ray"}) == V.SKIP
    assert V.exit_code(["ok", "ok"], allow_skip=False) == V.EXIT_OK
    assert V.exit_code(["ok", "skip"], allow_skip=False) == V.EXIT_SKIPPED
    assert V.exit_code(["ok", "skip"], allow_skip=True) == V.EXIT_OK
    assert V.exit_code(["ok", "skip", "fail"], allow_skip=True) == V.EXIT_FAILED
    assert V.exit_code(["skip", "skip"], allow_skip=True) == V.EXIT_SKIPPED  # nothing ran: never a pass
    assert V.exit_code([], allow_skip=True) == V.EXIT_SKIPPED
    line = V.summary_line({"a": "ok", "b": "skip"}, allow_skip=True)
    assert line == "1 ok, 0 failed, 1 skipped (skipped: b; allowed by --allow-skip)"
    assert V.over_budget(80, 60.4) == "needs ~80 s, 60 s of the check's time limit left"
    assert V.over_budget(10, 60) is None


def test_jax_on_cpu_only_beside_a_gpu_is_refused():
    devices = [type("Device", (), {"platform": "cpu"})()] * 2  # what jax.devices() gives without its CUDA plugin
    problem = V.jax_gpu_problem([d.platform for d in devices], gpu_present=True)
    assert problem and "JAX sees only cpu devices" in problem and "CUDA plugin" in problem
    assert V.jax_gpu_problem(["gpu"], gpu_present=True) is None
    assert V.jax_gpu_problem(["cuda", "cpu"], gpu_present=True) is None
    assert V.jax_gpu_problem(["cpu"], gpu_present=False) is None  # --dry-run-on-cpu: the CPU is the device
    assert V.jax_gpu_problem([], gpu_present=False) == "JAX reports no devices at all"


def test_env_problems():
    good = {
        "torch_version": "2.11.0+cu130", "torch_cuda": "13.0", "device_count": 1, "visible_gpus": 1,
        "driver_cuda": "13.0", "bf16_supported": True, "jax_cuda_plugin_major": 13,
    }  # fmt: skip
    assert V.env_problems(good) == []
    assert V.env_problems(dict(good, torch_version="2.11.0+cpu", torch_cuda=None)) == [
        "torch 2.11.0+cpu is not a CUDA build: install a CUDA torch"
    ]
    (problem,) = V.env_problems(dict(good, device_count=0))
    assert problem.startswith("torch sees no CUDA device")
    older = V.env_problems(dict(good, driver_cuda="12.4"))
    assert "torch is built for CUDA 13.0 but the driver supports CUDA 12.4 at most" in older
    assert "JAX's CUDA plugin is for CUDA 13 but the driver supports CUDA 12.4" in older
    assert V.env_problems(dict(good, driver_cuda=None))[0].startswith("the NVIDIA driver library")
    assert V.env_problems(dict(good, visible_gpus=2))[0] == (
        "torch sees 1 CUDA devices where the device nodes and CUDA_VISIBLE_DEVICES show 2"
    )
    assert V.env_problems(dict(good, bf16_supported=False)) == [
        "this GPU has no native bfloat16: the bf16 sections cannot pass"
    ]


def test_prepare_fits_60_mib(tmp_path):
    wheels = tmp_path / "wheels"
    proc = run_script("--prepare", str(wheels), timeout=300)
    if proc.returncode != 0 and "over the 60 MiB budget" not in proc.stderr:
        pytest.skip(f"no package index reachable: {proc.stderr.strip().splitlines()[-1:]}")
    assert proc.returncode == 0, proc.stderr
    names = sorted(p.name for p in wheels.iterdir())
    assert any(n.startswith("megatron_core-0.16.1-") for n in names), names
    assert any(n.startswith("sglang-0.5.10.post1-") for n in names), names
    image_provided = {"numpy", "triton"}  # torch's and JAX's own dependencies on the GPU image
    assert [m for m in SGLANG_IMPORT_MODULES if m not in image_provided and not carried(m, wheels)] == []
    assert sum(p.stat().st_size for p in wheels.iterdir()) <= 60 * 1024 * 1024


def test_a_skip_fails_the_run_unless_allowed(tmp_path):
    proc = run_module("--dry-run-on-cpu", "--only", "triton_logprob", "--out", str(tmp_path / "r.json"), timeout=120)
    assert proc.returncode == V.EXIT_SKIPPED, proc.stdout + proc.stderr
    assert "gpu_check: triton_logprob: SKIP" in proc.stdout
    assert json.loads((tmp_path / "r.json").read_text())["exit_code"] == V.EXIT_SKIPPED


def test_sections_run_on_the_host(tmp_path):
    out = tmp_path / "report.json"
    proc = run_module("--dry-run-on-cpu", "--allow-skip", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    sections = json.loads(out.read_text())["sections"]
    assert list(sections) == [s.name for s in SECTIONS]
    on_cpu = {s.name for s in SECTIONS if s.on_cpu}
    assert {n for n, s in sections.items() if s["status"] == "skip"} == {s.name for s in SECTIONS} - on_cpu
    if SGLANG.check(None) is not None:
        assert sections.pop("ipc_sglang")["status"] == "skip"
    else:
        ipc = sections["ipc_sglang"]
        assert ipc["receiver_wrote_into_sender_memory"] and not ipc["mismatched"] and ipc["received_on"] == ["cpu"]
    assert all(sections[name]["status"] == "ok" for name in on_cpu & set(sections)), sections
    fp32, bf16 = sections["megatron_float32"], sections["megatron_bfloat16"]
    assert fp32["log_probs_vs_hf_max_abs_diff"] < 1e-4 and fp32["exported_vs_trainer_max_abs_diff"] < 1e-4
    assert bf16["compute_dtype"] == "bfloat16" and bf16["moved_from_hf_float32_by"] > 1e-4  # --bf16 took effect
    assert sections["megatron_moe"]["experts"] == 4 and not sections["megatron_moe"]["exported_missing"]
    assert sections["embedded_bfloat16"]["engine_weights_dtype"] == "bfloat16"
    assert sections["embedded_float32"]["log_probs_vs_hf_max_abs_diff"] < 1e-4
    assert sections["jax_trainer"]["jax_device"].startswith("cpu")
    assert sections["env"]["report"]["selected"] == "cpu"
    train = sections["slime_train"]  # `slime train` on Ray: 3 colocated steps, --bf16, --ci-test held
    assert train["steps"] == 3 and train["weight_versions"] == [1.0, 2.0, 3.0], train


def test_full_check_on_the_gpu(tmp_path):
    """On a GPU runner with the full CUDA stack (SGLang, Ray, JAX's CUDA plugin): every section runs and passes."""
    if (reason := no_gpu_reason()) is not None:
        pytest.skip(reason)
    out = tmp_path / "gpu_check.json"
    proc = run_script("--out", str(out), timeout=600)
    report = json.loads(out.read_text())
    not_ok = {k: v.get("error") or v.get("reason") or v for k, v in report["sections"].items() if v["status"] != "ok"}
    assert proc.returncode == 0 and not not_ok, not_ok
