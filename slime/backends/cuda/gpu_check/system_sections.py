"""The sections about the machine and the whole loop: the CUDA environment, the Triton log-prob kernel, and a short
`slime train` colocated on the one GPU."""

from __future__ import annotations

import math
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

from slime.backends.cuda.gpu_check.common import CheckContext
from slime.backends.cuda.gpu_check.needs import jax_cuda_plugin_major
from slime.backends.cuda.gpu_check.verdicts import env_problems

ROWS, VOCAB = 256, 32768  # kernel check: a [rows, vocab] logits block
TRAIN_STEPS = 3


# ---- env ----------------------------------------------------------------------------------------------------
def driver_cuda_version() -> str | None:
    """The CUDA version the installed driver supports ("13.0"), from libcuda itself; None when it cannot load."""
    import ctypes

    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    version = ctypes.c_int(0)
    if lib.cuDriverGetVersion(ctypes.byref(version)) != 0:
        return None
    return f"{version.value // 1000}.{version.value % 1000 // 10}"


def cuda_facts() -> dict:
    import torch

    from slime.backends.cuda import CudaBackend

    count = torch.cuda.device_count() if torch.version.cuda else 0
    return {
        "torch_version": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "device_count": count,
        "device_name": torch.cuda.get_device_name(0) if count else None,
        "visible_gpus": CudaBackend().detect_devices()[0],
        "driver_cuda": driver_cuda_version(),
        "bf16_supported": torch.cuda.is_bf16_supported() if count else None,
        "jax_cuda_plugin_major": jax_cuda_plugin_major(),
    }


def check_env(ctx: CheckContext) -> dict:
    """`slime env`'s report, and the CUDA facts that make the other sections meaningful (the report alone is
    informational: this image lacks SGLang and Ray by design, so its cuda backend reads unavailable)."""
    from slime.env_report import collect_report

    report = collect_report("auto")
    if not ctx.on_gpu:
        return {"ok": report["selected"] == "cpu", "report": report}
    facts = cuda_facts()
    problems = env_problems(facts)
    return {"ok": not problems, "problems": problems, "facts": facts, "report": report}


# ---- Triton kernel ------------------------------------------------------------------------------------------
def _timed_median(fn: Callable[[], object], repeats: int = 5) -> float:
    import torch

    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _peak_bytes(fn: Callable[[], object]) -> int:
    import torch

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return int(torch.cuda.max_memory_allocated() - base)


def check_triton_logprob(ctx: CheckContext) -> dict:
    """The compiled Triton log-prob/entropy kernel against its torch reference: values, gradients, peak memory."""
    import torch

    from slime.kernels.registry import get_op

    g = torch.Generator(device="cuda").manual_seed(0)
    logits = (4 * torch.randn(ROWS, VOCAB, device="cuda", generator=g)).requires_grad_(True)
    tokens = torch.randint(0, VOCAB, (ROWS,), device="cuda", generator=g)
    out: dict = {"rows": ROWS, "vocab": VOCAB}
    results = {}
    for impl in ("torch", "triton"):
        op = get_op("logprobs_and_entropy", impl=impl)

        def forward_backward(op=op):
            logits.grad = None
            lp, ent = op(logits, tokens, temperature=0.7)
            (lp.sum() + 0.1 * ent.sum()).backward()
            return lp, ent

        lp, ent = forward_backward()
        results[impl] = (lp.detach(), ent.detach(), logits.grad.detach().clone())
        out[f"{impl}_seconds"] = _timed_median(forward_backward)
        out[f"{impl}_peak_bytes"] = _peak_bytes(forward_backward)
    (lp_t, ent_t, g_t), (lp_k, ent_k, g_k) = results["torch"], results["triton"]
    out["max_abs_diff"] = {
        "log_probs": float((lp_t - lp_k).abs().max()),
        "entropy": float((ent_t - ent_k).abs().max()),
        "grad": float((g_t - g_k).abs().max()),
    }
    out["ok"] = max(out["max_abs_diff"].values()) < 1e-3 and out["triton_peak_bytes"] <= out["torch_peak_bytes"]
    return out


# ---- slime train --------------------------------------------------------------------------------------------
def train_flags(ctx: CheckContext, data, out) -> list[str]:
    """A 3-step GRPO run, trainer and embedded engine colocated on the one GPU, both in bfloat16, weights handed
    over as IPC handles (--weight-sync ipc; on the CPU host the backend's default transport), --ci-test checking
    the step-0 trainer/engine agreement."""
    return [
        "--hf-checkpoint", str(ctx.model()), "--prompt-data", str(data), "--rm-type", "arithmetic",
        "--num-rollout", str(TRAIN_STEPS), "--rollout-batch-size", "4", "--n-samples-per-prompt", "4",
        "--global-batch-size", "16", "--micro-batch-size", "16", "--rollout-max-response-len", "4",
        "--rollout-engine-batch-size", "16", "--lr", "1e-3", "--output-dir", str(out), "--no-progress",
        "--colocate", "--bf16", "--rollout-engine", "embedded", "--rollout-dtype", "bfloat16", "--ci-test",
        "--hardware", ctx.backend.name, "--weight-sync", "ipc" if ctx.on_gpu else "auto",
    ]  # fmt: skip


def _run_train(flags: list[str], timeout_s: float) -> tuple[int | None, str]:
    """(exit code or None on timeout, the output's tail); its own session, so a timeout ends Ray's processes too."""
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled")
    cmd = [sys.executable, "-m", "slime.cli", "train", *flags]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True
    )
    try:
        output, _ = proc.communicate(timeout=timeout_s)
        return proc.returncode, output[-3000:]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        return None, output[-3000:]


def check_slime_train(ctx: CheckContext, budget_s: float) -> dict:
    from slime.quickstart import task
    from slime.run_log import read_metrics

    if ctx.on_gpu:
        import torch

        torch.cuda.empty_cache()  # this process's cached blocks would crowd the run's trainer and engine
    data = task.write_jsonl(task.problems(0)["train"][:256], ctx.folder / "train" / "train.jsonl")
    out = ctx.folder / "train" / "run"
    timeout = min(budget_s, max(ctx.seconds_left(), 1.0))
    start = time.perf_counter()
    code, tail = _run_train(train_flags(ctx, data, out), timeout)
    steps = [m for m in read_metrics(out) if m.get("phase") == "rl"]
    result = {
        "exit_code": code,
        "run_seconds": round(time.perf_counter() - start, 1),
        "steps": len(steps),
        "step_seconds": [m.get("perf/step_time") for m in steps],
        "weight_sync_seconds": [m.get("perf/weight_sync_time") for m in steps],
        "step0_trainer_vs_engine_logprob_mean_abs_diff": steps[0].get("ci/logprob_abs_diff_mean") if steps else None,
        "weight_versions": [m.get("weight_version") for m in steps],
    }
    if code != 0:
        ended = f"timed out after {timeout:.0f} s" if code is None else f"exited {code}"
        result["error"] = f"`slime train` {ended}"
        result["output_tail"] = tail
    result["ok"] = (
        code == 0
        and len(steps) == TRAIN_STEPS
        and all(math.isfinite(m.get("train/grad_norm", math.nan)) for m in steps)
        and all((m.get("perf/weight_sync_time") or 0) > 0 for m in steps)
    )
    return result
