"""Which rollout engine a run starts: `--rollout-engine`, or the hardware backend's default, i.e. the first of
its `Capabilities.rollout_engines` whose package is installed (a backend lists an engine it runs only when asked
for, such as sglang-jax, after its built-in one). Checked before Ray starts, failing in one line."""

from __future__ import annotations

import re

from slime.backends.base import Backend
from slime.errors import FlagError

# The module each engine imports, and how to install it.
ENGINE_PACKAGES: dict[str, tuple[str, str]] = {
    "embedded": ("torch", "pip install torch"),
    "jax": ("jax", "pip install jax"),
    "sglang": ("sglang", "pip install sglang (GPU machines)"),
    "sglang_jax": ("sgl_jax", "pip install sglang-jax (Python >= 3.12)"),
}


def default_rollout_engine(backend: Backend) -> str:
    """The backend's first declared engine that is installed (its first declared one when none is)."""
    engines = backend.capabilities.rollout_engines
    installed = [e for e in engines if backend.system.has_module(ENGINE_PACKAGES[e][0])]
    return (installed or list(engines))[0]


def rollout_engine(requested: str | None, backend: Backend) -> str:
    """`requested` (--rollout-engine) or, when None, the backend's default; an engine the backend does not offer,
    or one whose package is missing, is refused here."""
    engine = requested or default_rollout_engine(backend)
    offered = backend.capabilities.rollout_engines
    if engine not in offered:
        raise FlagError(
            f"--rollout-engine {engine}: the {backend.name} hardware backend runs {', '.join(offered)} engines"
        )
    module, _ = ENGINE_PACKAGES[engine]
    if not backend.system.has_module(module):
        raise FlagError(
            f"--rollout-engine {engine} needs the {module} package: {engine_install_command(engine, backend)}"
        )
    return engine


def engine_install_command(engine: str, backend: Backend) -> str:
    """How to install an engine's package: from the backend's known-good commit where it pins one (no working
    release on the index), else ENGINE_PACKAGES' command."""
    module, install = ENGINE_PACKAGES[engine]
    dists = {r.dist for r in (*backend.requirements, *backend.optional) if r.module == module}
    pinned = [source.install_command for source in backend.pinned_sources if source.dist in dists]
    return pinned[0] if pinned else install


# ---- sglang-jax: in this process, or a server restarted on every update ---------------------------------------
# What the in-process adapter (sglang_jax/in_process.py) uses, as it appears in sglang-jax's source: the offline
# Engine keeps `scheduler_info` (the scheduler object itself when it runs in this process), ServerArgs has the
# `enable_single_process` field, and the model runner's jitted calls read `model_state_leaves` on every call (the
# leaves a weight update rebinds, as tunix's sampler does).
SGLANG_JAX_IN_PROCESS_API: tuple[tuple[str, str, str], ...] = (
    ("srt/server_args.py", r"^\s+enable_single_process\s*:", "ServerArgs has no enable_single_process"),
    ("srt/entrypoints/engine.py", r"self\.scheduler_info\s*=", "its Engine keeps no scheduler_info"),
    (
        "srt/model_executor/model_runner.py",
        r"self\.model_state_leaves\b",
        "its model runner has no model_state_leaves to rebind",
    ),
)


def sglang_jax_in_process_problem(sources: dict[str, str | None], version: str | None) -> str | None:
    """Why the installed sglang-jax cannot run in this process (one line), or None when it can. `sources`: the
    text of each file SGLANG_JAX_IN_PROCESS_API names (None when the file is missing)."""
    for path, pattern, missing in SGLANG_JAX_IN_PROCESS_API:
        text = sources.get(path)
        if text is None or not re.search(pattern, text, re.MULTILINE):
            return f"sglang-jax {version or '(version unknown)'}: {missing} (sgl_jax/{path})"
    return None


def installed_sglang_jax_sources() -> tuple[dict[str, str | None], str | None]:
    """The installed sgl_jax files SGLANG_JAX_IN_PROCESS_API reads, found without importing sgl_jax (which loads
    JAX and starts its runtime), and the distribution's version."""
    import importlib.metadata
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("sgl_jax")
    roots = [Path(p) for p in (spec.submodule_search_locations or [])] if spec else []
    sources: dict[str, str | None] = {}
    for path, _, _ in SGLANG_JAX_IN_PROCESS_API:
        found = [root / path for root in roots if (root / path).is_file()]
        sources[path] = found[0].read_text(encoding="utf-8", errors="replace") if found else None
    try:
        version = importlib.metadata.version("sglang-jax")
    except importlib.metadata.PackageNotFoundError:
        version = None
    return sources, version


def sglang_jax_mode() -> tuple[bool, str]:
    """(in process?, why not): the in-process adapter when the installed sglang-jax has what it uses, else the
    server restarted from a written checkpoint on every update, with the one-line reason the run log shows."""
    problem = sglang_jax_in_process_problem(*installed_sglang_jax_sources())
    if problem is None:
        return True, ""
    return False, f"sglang-jax restarts its server on every weight update: {problem} (in-process needs a newer one)"


def engine_in_trainer_process(
    colocate: bool, family: str, kind: str, engines: int, sglang_jax_in_process: bool
) -> bool:
    """Whether the run's one rollout engine lives inside the trainer's actor: --colocate with the JAX trainer and
    a JAX engine (the built-in one, or sglang-jax when it runs in process). Weights then go over device to device,
    and the engine needs no device of its own, so devices Ray schedules only whole can colocate too."""
    in_process_kind = kind == "jax" or (kind == "sglang_jax" and sglang_jax_in_process)
    return colocate and family == "jax" and in_process_kind and engines == 1
