"""The run's config against what the selected backend can do (`Backend.capabilities`), before Ray starts.

`check_against_capabilities` returns one line per impossible combination; `require_capabilities` raises
them as a ConfigError. Each rule is a small function of (config, backend) in RULES, so a flag that picks
among a capability (e.g. --train-backend, --rollout-engine) adds its rule here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from slime.backends.base import Backend

if TYPE_CHECKING:
    from slime.config import Config

FALSE_WORDS = ("false", "0", "no")


def chosen_rollout_engine(config: Config, backend: Backend) -> str:
    """The engine this run starts: --rollout-engine or the backend's default (slime.rollout.engines.selection)."""
    from slime.rollout.engines.selection import rollout_engine

    return rollout_engine(config, backend)


def _engine_in_trainer(config: Config, backend: Backend) -> bool:
    """--colocate whose one engine lives inside the JAX trainer's actor: no device is split between two
    processes, and weights go over in process (slime.rollout.engines.selection.engine_in_trainer_process)."""
    from slime.config import ConfigError
    from slime.settings import engine_hosted_by_trainer

    try:
        return engine_hosted_by_trainer(config, backend)
    except ConfigError:  # an engine or trainer the backend refuses: its own rule says so
        return False


def _colocate_needs_split_devices(config: Config, backend: Backend) -> str | None:
    if config.cluster.colocate and not backend.fractional_devices and not _engine_in_trainer(config, backend):
        return (
            f"--colocate puts trainer and engine processes on one device, but --hardware {backend.name} devices "
            f"({backend.ray_device_resource}) are scheduled only whole: run without --colocate, or colocate the JAX pair with one engine (it runs in the "
            "trainer's process)"
        )
    return None


def _colocate_needs_memory_saver(config: Config, backend: Backend) -> str | None:
    # Host memory (a CPU "device" is a process) needs no releasing; an accelerator's memory does, or the
    # trainer cannot onload while the engine holds its weights and KV cache.
    # An engine in the trainer's process shares its device memory; the JAX engine frees its KV cache itself.
    accelerator = backend.ray_device_resource != "CPU"
    if config.cluster.colocate and accelerator and not backend.capabilities.memory_saver:
        if _engine_in_trainer(config, backend):
            return None
        return (
            f"--colocate needs engines that release device memory, and --hardware {backend.name} has none "
            "(capabilities.memory_saver is false): run without --colocate"
        )
    return None


def _rollout_engine_offered(config: Config, backend: Backend) -> str | None:
    engine = chosen_rollout_engine(config, backend)
    if engine not in backend.capabilities.rollout_engines:
        offered = ", ".join(backend.capabilities.rollout_engines)
        return f"rollout engine {engine!r} does not run on --hardware {backend.name} (it offers: {offered})"
    return None


def _sglang_colocate_memory_saver(config: Config, backend: Backend) -> str | None:
    if not config.cluster.colocate or chosen_rollout_engine(config, backend) != "sglang":
        return None
    if config.sglang.get("enable_memory_saver", "false").lower() in FALSE_WORDS:
        return "--colocate with SGLang engines needs --sglang-enable-memory-saver (else the engine keeps its memory)"
    return None


def _moe_dispatcher_offered(config: Config, backend: Backend) -> str | None:
    dispatcher = config.megatron.get("moe_token_dispatcher_type")
    if dispatcher is not None and dispatcher not in backend.capabilities.moe_dispatchers:
        offered = ", ".join(backend.capabilities.moe_dispatchers)
        return f"--moe-token-dispatcher-type {dispatcher} is not available on --hardware {backend.name} (use one of: {offered})"
    return None


def _default_weight_sync_offered(config: Config, backend: Backend) -> str | None:
    if not backend.capabilities.weight_sync:
        return f"--hardware {backend.name} declares no weight-sync transport: the engines could never get new weights"
    return None


RULES: list[Callable[[Config, Backend], str | None]] = [
    _colocate_needs_split_devices,
    _colocate_needs_memory_saver,
    _rollout_engine_offered,
    _sglang_colocate_memory_saver,
    _moe_dispatcher_offered,
    _default_weight_sync_offered,
]


def check_against_capabilities(config: Config, backend: Backend) -> list[str]:
    """One line per combination the backend cannot run; empty when the run can start."""
    return [problem for rule in RULES if (problem := rule(config, backend)) is not None]


def require_capabilities(config: Config, backend: Backend) -> None:
    from slime.config import ConfigError

    problems = check_against_capabilities(config, backend)
    if problems:
        raise ConfigError("; ".join(problems))
