"""The plan (every section, what it proves, what it needs, its time budget), --dry-run, and the run itself: each
section timed and independent, the JSON report rewritten after every section (a run cut short still leaves one)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from slime.backends.cuda.gpu_check import needs as N
from slime.backends.cuda.gpu_check.common import CheckContext
from slime.backends.cuda.gpu_check.verdicts import (
    EXIT_NO_GPU,
    FAIL,
    SKIP,
    exit_code,
    over_budget,
    section_status,
    summary_line,
)

TIME_LIMIT_S = 220  # the whole run on one H100 (scripts/gpu_check.sh installs the wheels first, then stops it at 230 s)


@dataclass(frozen=True)
class Section:
    name: str
    proves: str
    needs: tuple[N.Need, ...]
    budget_s: int  # an estimate for one H100, not yet measured there: skipped when it no longer fits
    run: Callable[[CheckContext], dict]
    on_cpu: bool  # --dry-run-on-cpu runs it on the host (the GPU needs waived, a CPU JAX accepted)


def _lazy(module: str, function: str, **kwargs) -> Callable[[CheckContext], dict]:
    """The section's function, imported only when it runs (--dry-run imports none of them)."""

    def run(ctx: CheckContext) -> dict:
        import importlib

        return getattr(importlib.import_module(f"slime.backends.cuda.gpu_check.{module}"), function)(ctx, **kwargs)

    return run


SECTIONS = (
    Section("env", "torch is a CUDA build seeing the GPU; the driver's CUDA >= torch's and JAX's; bf16 native; "
            "`slime env`", (N.GPU,), 5, _lazy("system_sections", "check_env"), True),
    Section("triton_logprob", "the compiled Triton log-prob/entropy kernel = torch's: values, gradients, less memory",
            (N.GPU, N.TRITON), 10, _lazy("system_sections", "check_triton_logprob"), False),
    Section("ipc_sglang", "a flattened bucket's IPC handles (by device UUID) opened in a 2nd process by SGLang's own "
            "deserialiser: same bytes, same memory", (N.GPU, N.SGLANG), 25,
            _lazy("ipc_section", "check_ipc_sglang"), True),
    Section("megatron_float32", "the Megatron trainer's log-probs = transformers' (1e-3), one step, exported weights",
            (N.GPU, N.MEGATRON, N.TRANSFORMERS), 20, _lazy("trainer_sections", "check_megatron", bf16=False), True),
    Section("megatron_bfloat16", "the same through `--bf16` (compute_dtype bfloat16): vs transformers under bf16 "
            "autocast, and off float32", (N.GPU, N.MEGATRON, N.TRANSFORMERS), 10,
            _lazy("trainer_sections", "check_megatron", bf16=True), True),
    Section("megatron_moe", "a tiny Qwen3-MoE (4 experts, top-2) in the Megatron trainer = transformers (float32)",
            (N.GPU, N.MEGATRON, N.TRANSFORMERS), 15,
            _lazy("trainer_sections", "check_megatron", bf16=False, experts=4), True),
    Section("embedded_float32", "the embedded engine (as a run's engine worker starts it): greedy log-probs = "
            "transformers'", (N.GPU, N.TRANSFORMERS), 10,
            _lazy("engine_sections", "check_embedded_engine", dtype="float32"), True),
    Section("embedded_bfloat16", "the same through `--rollout-dtype bfloat16`: bf16 weights, vs transformers in bf16",
            (N.GPU, N.TRANSFORMERS), 10, _lazy("engine_sections", "check_embedded_engine", dtype="bfloat16"), True),
    Section("jax_trainer", "the JAX trainer on JAX's GPU (a CPU-only JAX fails): log-probs, one step, export",
            (N.GPU, N.JAX_GPU, N.OPTAX, N.TRANSFORMERS), 35, _lazy("trainer_sections", "check_jax_trainer"), True),
    Section("slime_train", "`slime train`, 3 GRPO steps, trainer and embedded engine colocated on the GPU in bf16, "
            "IPC weight sync, --ci-test", (N.GPU, N.MEGATRON, N.RAY, N.TRANSFORMERS), 75,
            _lazy("system_sections", "check_slime_train", budget_s=75), True),
)  # fmt: skip

_JAX_ON_CPU = N.modules_need("jax (its CPU backend: no GPU in this mode)", ("jax",))


def needs_here(section: Section, on_gpu: bool) -> tuple[N.Need, ...]:
    if on_gpu:
        return section.needs
    return tuple(_JAX_ON_CPU if n is N.JAX_GPU else n for n in section.needs if n is not N.GPU)


# ---- --dry-run ----------------------------------------------------------------------------------------------
def dry_run(wheels: Path | None) -> int:
    """Every section, what it needs and whether this machine (with --wheels: once DIR's wheels are installed) has
    it. Imports nothing heavy, runs nothing, always exits 0."""
    here = f"{sys.executable} (Python {sys.version.split()[0]})" + (f" with the wheels in {wheels}" if wheels else "")
    print(f"gpu_check --dry-run: {len(SECTIONS)} sections, about {sum(s.budget_s for s in SECTIONS)} s on one H100 "
          f"(limit {TIME_LIMIT_S} s); needs checked for {here}")  # fmt: skip
    would_run = 0
    for section in SECTIONS:
        found = [(need, need.check(wheels)) for need in section.needs]
        runs = all(why is None for _, why in found)
        would_run += runs
        print(f"\n{section.name:<18} ~{section.budget_s:>3} s  {'would run' if runs else 'would SKIP'}")
        print(f"  proves: {section.proves}")
        for need, why in found:
            print(f"  needs {need.label}: {'met' if why is None else 'NOT MET, ' + why}")
    skipped = len(SECTIONS) - would_run
    print(f"\ngpu_check --dry-run: {would_run} of {len(SECTIONS)} sections would run here; {skipped} would SKIP"
          + (" (a real run then exits 3 unless --allow-skip)" if skipped else ""))  # fmt: skip
    return 0


# ---- the run ------------------------------------------------------------------------------------------------
def run_section(section: Section, ctx: CheckContext) -> dict:
    start = time.perf_counter()
    if not ctx.on_gpu and not section.on_cpu:
        result = {"status": SKIP, "reason": "needs a GPU (no CPU variant for --dry-run-on-cpu)"}
    elif missing := N.unmet(needs_here(section, ctx.on_gpu)):
        result = {"status": SKIP, "reason": "; ".join(missing)}
    elif late := over_budget(section.budget_s, ctx.seconds_left()):
        result = {"status": SKIP, "reason": f"out of time: {late}"}
    else:
        try:
            result = section.run(ctx)
        except Exception as exc:  # one broken section must not hide the others' findings
            result = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-4000:]}
    result["status"] = section_status(result)
    result["seconds"] = round(time.perf_counter() - start, 3)
    result["budget_s"] = section.budget_s
    why = result.get("reason") or result.get("error") or ("see the report" if result["status"] == FAIL else "")
    print(f"gpu_check: {section.name}: {result['status'].upper()} ({result['seconds']} s){': ' + why if why else ''}")
    return result


def _write(report: dict, out: Path) -> None:
    out.write_text(json.dumps(report, indent=1, default=str) + "\n")


def run_all(ctx: CheckContext, out: Path, allow_skip: bool, only: set[str] | None) -> int:
    import torch

    report: dict = {"python": sys.version.split()[0], "torch": torch.__version__, "on_gpu": ctx.on_gpu, "sections": {}}
    if ctx.on_gpu:
        report["device"] = torch.cuda.get_device_name(0)
    for section in SECTIONS:
        if only is None or section.name in only:
            report["sections"][section.name] = run_section(section, ctx)
            _write(report, out)
    statuses = {name: s["status"] for name, s in report["sections"].items()}
    report["summary"] = summary_line(statuses, allow_skip)
    report["exit_code"] = code = exit_code(statuses.values(), allow_skip)
    _write(report, out)
    verdict = "all ok" if code == 0 else ("FAILURES" if FAIL in statuses.values() else "sections SKIPPED")
    print(f"gpu_check: {report['summary']}; wrote {out} ({verdict})")
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gpu_check", description="one-shot check of slime's GPU paths on one GPU")
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    parser.add_argument("--dry-run", action="store_true", help="list every section and its needs; run nothing")
    parser.add_argument("--wheels", type=Path, help="--dry-run: count these carried wheels as installed")
    parser.add_argument("--site-after", type=Path, help="a folder of carried packages, searched after this image's")
    parser.add_argument("--allow-skip", action="store_true", help="exit 0 when sections skip (not when they fail)")
    parser.add_argument("--only", help="comma-separated section names")
    parser.add_argument(
        "--dry-run-on-cpu", action="store_true", help="CI: the sections with a CPU variant, on the host"
    )
    args = parser.parse_args(argv)
    if args.site_after:
        sys.path.append(str(args.site_after.resolve()))  # spawned receivers inherit sys.path
    if args.dry_run:
        return dry_run(args.wheels)
    # torch and JAX share the GPU in this one process: JAX must not grab most of its memory up front.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    deadline = time.monotonic() + TIME_LIMIT_S
    only = set(args.only.split(",")) if args.only else None
    if args.dry_run_on_cpu:
        from slime.backends.cpu import CpuBackend

        backend, on_gpu = CpuBackend(), False
    else:
        from slime.backends.cuda import CudaBackend
        from slime.backends.cuda.gpu_check import no_gpu_reason

        if (reason := no_gpu_reason()) is not None:
            print(f"gpu_check: no GPU on this machine ({reason}); nothing to check")
            return EXIT_NO_GPU
        backend, on_gpu = CudaBackend(), True
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        return run_all(CheckContext(backend, Path(tmp), on_gpu, deadline), args.out, args.allow_skip, only)
