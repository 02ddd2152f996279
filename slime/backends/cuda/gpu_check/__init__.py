"""One-shot GPU check: a short run on a single NVIDIA GPU that writes one JSON report.

    python -m slime.backends.cuda.gpu_check --out gpu_check.json     (scripts/gpu_check.sh wraps this)
    python -m slime.backends.cuda.gpu_check --dry-run                every section, what it needs, whether it is here

The sections (cli.SECTIONS: what each proves, needs and may take) are independent: one failing does not stop the
others. A section whose needs are not met says SKIP, and a skip makes the run exit non-zero unless --allow-skip.
Built for a machine without network: models and data are built locally, as the CPU quickstart does.

Modules: verdicts (the decisions, pure), needs (what is installed, found cheaply), common (context, tiny models,
references), system_sections (env, Triton, `slime train`), ipc_section, trainer_sections, engine_sections, cli.
"""

from __future__ import annotations


def no_gpu_reason() -> str | None:
    """Why this machine cannot run the check (None when a GPU is visible); reads device nodes only."""
    from slime.backends.cuda import CudaBackend

    count, reason = CudaBackend().detect_devices()
    return None if count else reason
