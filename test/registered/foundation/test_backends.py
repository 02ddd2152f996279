"""The hardware layer: detection with each stack absent or present, selection, messages, and the rule
that device-stack words stay under slime/backends/."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from slime.backends import BackendUnavailable, SystemView, backend_names, probe_all, select_backend
from slime.testing.ci_register import register_cpu_ci

register_cpu_ci(est_time=10, suite="base-a-test-cpu")

REPO = Path(__file__).resolve().parents[3]


def fake_system(modules=(), dists=None, paths=(), dirs=None, environ=None) -> SystemView:
    dists = dists or {}
    dirs = dirs or {}
    return SystemView(
        has_module=lambda m: m in modules,
        dist_version=lambda d: dists.get(d),
        path_exists=lambda p: p in paths,
        list_dir=lambda p: list(dirs.get(p, [])),
        environ=dict(environ or {}),
    )


CPU_STACK = ("torch", "megatron.core", "transformers", "safetensors", "ray")
CUDA_STACK = ("torch", "megatron.core", "sglang", "triton", "ray")


def test_detection_order_is_fixed():
    assert backend_names() == ("cuda", "rocm", "tpu", "cpu")


def test_bare_machine_with_cpu_stack_selects_cpu():
    system = fake_system(modules=CPU_STACK, dists={"torch": "2.13.0+cpu"})
    assert select_backend("auto", system).name == "cpu"
    by_name = {p.name: p for p in probe_all(system)}
    assert by_name["cpu"].available
    assert not by_name["cuda"].available and "no NVIDIA GPU" in by_name["cuda"].reason


def test_cpu_missing_stack_is_one_line_naming_packages_and_extra():
    system = fake_system(modules=("torch",), dists={"torch": "2.13.0+cpu"})
    with pytest.raises(BackendUnavailable) as info:
        select_backend("cpu", system)
    message = str(info.value)
    assert "\n" not in message
    assert "transformers, safetensors, ray" in message
    assert "pip install 'slime-rl[cpu]'" in message


def test_gpu_machine_with_full_stack_prefers_gpu():
    system = fake_system(
        modules=CUDA_STACK + CPU_STACK,
        dists={"torch": "2.13.0"},
        dirs={"/proc/driver/nvidia/gpus": ["0000:01:00.0", "0000:02:00.0"]},
    )
    backend = select_backend("auto", system)
    assert backend.name == "cuda"
    assert {p.name: p.devices for p in probe_all(system)}["cuda"] == 2
    assert backend.rollout_engine == "sglang" and backend.kernel_impl == "triton"


def test_gpu_present_but_sglang_missing_falls_back_in_auto_and_fails_when_asked():
    system = fake_system(
        modules=CPU_STACK + ("triton",), dists={"torch": "2.13.0"}, dirs={"/dev": ["nvidia0", "nvidiactl"]}
    )
    assert select_backend("auto", system).name == "cpu"
    with pytest.raises(
        BackendUnavailable, match=r"^--hardware cuda is not usable: missing megatron-core, sglang|missing sglang"
    ):
        select_backend("cuda", system)


def test_visible_devices_env_hides_gpus():
    system = fake_system(
        modules=CUDA_STACK, dists={"torch": "2.13.0"}, dirs={"/dev": ["nvidia0"]}, environ={"CUDA_VISIBLE_DEVICES": ""}
    )
    probe = {p.name: p for p in probe_all(system)}["cuda"]
    assert not probe.available and "hides every GPU" in probe.reason


def test_cpu_torch_build_on_gpu_machine_is_explained():
    system = fake_system(modules=CUDA_STACK, dists={"torch": "2.13.0+cpu"}, dirs={"/dev": ["nvidia0"]})
    probe = {p.name: p for p in probe_all(system)}["cuda"]
    assert not probe.available and "cpu build" in probe.reason


def test_amd_machine_needs_a_rocm_torch():
    dirs = {"/dev/dri": ["card0", "renderD128", "renderD129"]}
    modules = ("torch", "megatron.core", "sglang", "triton", "ray")
    rocm = fake_system(modules=modules, dists={"torch": "2.9.1+rocm6.4"}, paths={"/dev/kfd"}, dirs=dirs)
    assert select_backend("auto", rocm).name == "rocm"
    assert {p.name: p.devices for p in probe_all(rocm)}["rocm"] == 2
    wrong = fake_system(modules=modules, dists={"torch": "2.13.0"}, paths={"/dev/kfd"}, dirs=dirs)
    probe = {p.name: p for p in probe_all(wrong)}["rocm"]
    assert not probe.available and "not a ROCm build" in probe.reason


def test_tpu_vm_with_jax_stack():
    from slime.rollout.engines.selection import default_rollout_engine

    system = fake_system(
        modules=("jax", "libtpu", "flax", "optax", "sgl_jax"), dirs={"/dev": ["accel0", "accel1", "accel2", "accel3"]}
    )
    backend = select_backend("auto", system)
    # the built-in JAX engine is the default even with sglang-jax installed: no release of sglang-jax on the index
    # serves RL, so it runs only when asked for (--rollout-engine sglang_jax)
    assert backend.name == "tpu" and default_rollout_engine(backend) == "jax"
    assert backend.describe()["rollout_engine"] == "jax"
    # sglang-jax is optional, and its absence names the command that adds the known-good commit
    without_sglang_jax = fake_system(modules=("jax", "libtpu", "flax", "optax"), dirs={"/dev": ["accel0"]})
    backend = select_backend("auto", without_sglang_jax)
    assert backend.name == "tpu" and default_rollout_engine(backend) == "jax"
    assert [r.dist for r in backend.missing_optional()] == ["sglang-jax"]
    assert "sglang-jax @ git+https://github.com/sgl-project/sglang-jax@" in backend.missing_optional()[0].note
    # asking for it where it is missing names the same command, never the index's release
    from slime.backends.tpu import SGLANG_JAX
    from slime.rollout.engines.selection import engine_install_command

    assert engine_install_command("sglang_jax", backend) == SGLANG_JAX.install_command
    assert engine_install_command("jax", backend) == "pip install jax"


def test_unknown_hardware_name():
    with pytest.raises(BackendUnavailable, match="unknown hardware 'npu'; choose one of: auto, cuda, rocm, tpu, cpu"):
        select_backend("npu", fake_system())


def test_probing_imports_no_heavy_stack():
    code = (
        "import sys; from slime.backends import probe_all, select_backend; probe_all(); select_backend('auto');"
        "heavy=[m for m in ('torch','jax','sglang','megatron','ray','triton','transformers') if m in sys.modules];"
        "print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]"


def test_slime_env_json_reports_backends_packages_and_extras():
    out = subprocess.run([sys.executable, "-m", "slime.cli", "env", "--json"], capture_output=True, text=True, cwd=REPO)
    report = json.loads(out.stdout)
    assert [b["name"] for b in report["backends"]] == ["cuda", "rocm", "tpu", "cpu"]
    assert set(report["packages"]) >= {
        "torch",
        "megatron-core",
        "sglang",
        "sglang-jax",
        "jax",
        "ray",
        "triton",
        "deep_ep",
    }
    assert report["selected"] == "cpu"
    assert report["extras"]["cpu"]["satisfied"] is True
    cuda = next(b for b in report["backends"] if b["name"] == "cuda")
    assert cuda["available"] is False and cuda["reason"]


def test_slime_env_unavailable_hardware_exits_nonzero_with_reason():
    out = subprocess.run(
        [sys.executable, "-m", "slime.cli", "env", "--hardware", "tpu"], capture_output=True, text=True, cwd=REPO
    )
    assert out.returncode == 1
    assert "hardware: none usable: --hardware tpu is not usable: no TPU found" in out.stdout


# Device-stack words may appear only in slime/backends/. The allow-list names a file and the reason.
HARDWARE_WORDS = re.compile(r"\b(cuda|hip|rocm|xla|nccl|rccl|tpu)\b|torch\.cuda|\.cuda\(|jax\.devices\(", re.IGNORECASE)
ALLOWED: dict[str, str] = {
    "slime/testing/ci_register.py": "the registration API is named per hardware target (register_cuda_ci, ...)",
    "slime/testing/registry.py": "maps suite names to hardware targets",
}


def test_hardware_words_only_under_backends():
    offenders = []
    for path in sorted((REPO / "slime").rglob("*.py")):
        rel = path.relative_to(REPO).as_posix()
        if rel.startswith("slime/backends/") or rel in ALLOWED:
            continue
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            if HARDWARE_WORDS.search(line):
                offenders.append(f"{rel}:{lineno}: {line.strip()}")
    assert offenders == [], "hardware words outside slime/backends/:\n" + "\n".join(offenders)
