"""Which rollout engine a run starts: `--rollout-engine`, or the hardware backend's default, i.e. the first of
its `Capabilities.rollout_engines` whose package is installed (e.g. sglang-jax where installed, else the
JAX engine). Checked before Ray starts, failing in one line."""

from __future__ import annotations

from slime.backends.base import Backend
from slime.config import Config, ConfigError

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


def rollout_engine(config: Config, backend: Backend) -> str:
    """--rollout-engine or the backend's default; an engine the backend does not offer, or one whose package is
    missing, is refused here."""
    engine = config.rollout.rollout_engine or default_rollout_engine(backend)
    offered = backend.capabilities.rollout_engines
    if engine not in offered:
        raise ConfigError(
            f"--rollout-engine {engine}: the {backend.name} hardware backend runs {', '.join(offered)} engines"
        )
    module, install = ENGINE_PACKAGES[engine]
    if not backend.system.has_module(module):
        raise ConfigError(f"--rollout-engine {engine} needs the {module} package: {install}")
    return engine
