"""The check's decisions as pure functions over plain values: a section's status, the run's exit code, whether JAX
really has a GPU, what is wrong with the CUDA environment. No torch, JAX or GPU needed to test them."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

OK, FAIL, SKIP = "ok", "fail", "skip"

# Exit codes of a real run (2 is taken by "no GPU on this machine").
EXIT_OK, EXIT_FAILED, EXIT_NO_GPU, EXIT_SKIPPED = 0, 1, 2, 3

# JAX's names for a GPU platform (CUDA plugin: "gpu" from jax.devices(), "cuda" from device.platform on newer jaxlib).
JAX_GPU_PLATFORMS = ("gpu", "cuda", "rocm")


def section_status(result: Mapping) -> str:
    """ok only when the section said ok=True; an explicit skip stays a skip; anything else (False, None, missing) is
    a failure, so a section that forgot to decide cannot pass."""
    if result.get("status") == SKIP:
        return SKIP
    return OK if result.get("ok") is True else FAIL


def exit_code(statuses: Iterable[str], allow_skip: bool) -> int:
    """Any failure -> 1; any skip -> 3 unless --allow-skip; else 0. A check that ran nothing never passes."""
    statuses = list(statuses)
    if FAIL in statuses:
        return EXIT_FAILED
    if not statuses or (SKIP in statuses and (not allow_skip or all(s == SKIP for s in statuses))):
        return EXIT_SKIPPED
    return EXIT_OK


def summary_line(statuses: Mapping[str, str], allow_skip: bool) -> str:
    counts = {s: sum(1 for v in statuses.values() if v == s) for s in (OK, FAIL, SKIP)}
    code = exit_code(statuses.values(), allow_skip)
    skipped = [name for name, s in statuses.items() if s == SKIP]
    tail = (
        f" (skipped: {', '.join(skipped)}{'; allowed by --allow-skip' if code == EXIT_OK else ''})" if skipped else ""
    )
    return f"{counts[OK]} ok, {counts[FAIL]} failed, {counts[SKIP]} skipped{tail}"


def jax_gpu_problem(platforms: list[str], gpu_present: bool) -> str | None:
    """`platforms`: jax.devices()'s device platforms. None when JAX can run where it should: on a GPU when this
    machine has one (a CPU-only JAX beside a GPU means its CUDA plugin is missing or failed to load), anywhere
    otherwise."""
    if not platforms:
        return "JAX reports no devices at all"
    if gpu_present and not any(p.lower() in JAX_GPU_PLATFORMS for p in platforms):
        return (
            f"JAX sees only {', '.join(sorted(set(platforms)))} devices on a machine with an NVIDIA GPU: its CUDA "
            "plugin is missing or failed to load (pip install 'jax[cuda13]' or 'jax[cuda12]' to match the driver)"
        )
    return None


def _major_minor(version: str | None) -> tuple[int, int] | None:
    if not version:
        return None
    parts = version.split(".")
    try:
        return int(parts[0]), int(parts[1]) if len(parts) > 1 else 0
    except ValueError:
        return None


def env_problems(facts: Mapping) -> list[str]:
    """What makes this CUDA environment unfit for the check, from facts gathered on the GPU machine:
    torch_version, torch_cuda (torch.version.cuda), device_count (torch's), visible_gpus (device nodes and
    CUDA_VISIBLE_DEVICES), driver_cuda ("13.0"; None when libcuda cannot be loaded), bf16_supported,
    jax_cuda_plugin_major (None without a JAX CUDA plugin)."""
    if not facts.get("torch_cuda"):
        return [f"torch {facts.get('torch_version')} is not a CUDA build: install a CUDA torch"]
    problems = []
    driver = _major_minor(facts.get("driver_cuda"))
    runtime = _major_minor(facts["torch_cuda"])
    if driver is None:
        problems.append("the NVIDIA driver library (libcuda.so.1) cannot be loaded or reports no CUDA version")
    elif runtime is not None and driver < runtime:
        problems.append(
            f"torch is built for CUDA {facts['torch_cuda']} but the driver supports CUDA {facts['driver_cuda']} at most"
        )
    if not facts.get("device_count"):
        problems.append("torch sees no CUDA device (driver, CUDA_VISIBLE_DEVICES or container runtime)")
    elif facts.get("visible_gpus") is not None and facts["device_count"] != facts["visible_gpus"]:
        problems.append(
            f"torch sees {facts['device_count']} CUDA devices where the device nodes and CUDA_VISIBLE_DEVICES "
            f"show {facts['visible_gpus']}"
        )
    if facts.get("device_count") and facts.get("bf16_supported") is False:
        problems.append("this GPU has no native bfloat16: the bf16 sections cannot pass")
    jax_major = facts.get("jax_cuda_plugin_major")
    if jax_major is not None and driver is not None and driver[0] < jax_major:
        problems.append(
            f"JAX's CUDA plugin is for CUDA {jax_major} but the driver supports CUDA {facts['driver_cuda']}"
        )
    return problems


def over_budget(budget_s: float, remaining_s: float) -> str | None:
    """Why a section is not started: its budget no longer fits in the time the whole check has left."""
    if budget_s > remaining_s:
        return f"needs ~{budget_s:.0f} s, {max(remaining_s, 0):.0f} s of the check's time limit left"
    return None
