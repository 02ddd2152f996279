"""What a run needs (RunNeeds) against what the selected backend can do (`Backend.capabilities`), before Ray
starts.

`check_against_capabilities` returns one line per impossible combination; `require_capabilities` raises
them as a FlagError. Each rule is a small function of (RunNeeds, backend) in RULES, so a flag that picks
among a capability (e.g. --train-backend, --rollout-engine) adds its field to RunNeeds and its rule here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from slime.backends.base import Backend
from slime.errors import FlagError


@dataclass(frozen=True)
class RunNeeds:
    """What a run asks of the hardware, as the rules below read it (built from the run config by
    slime.settings.run_needs)."""

    rollout_engine: str  # --rollout-engine or the backend's default (slime.rollout.engines.selection)
    colocate: bool = False  # --colocate
    # the one engine lives inside the JAX trainer's actor (slime.rollout.engines.selection.engine_in_trainer_process):
    # no device is split between two processes, and weights go over in process
    engine_in_trainer: bool = False
    sglang_memory_saver: bool = False  # --sglang-enable-memory-saver
    moe_dispatcher: str | None = None  # --moe-token-dispatcher-type


def _colocate_needs_split_devices(needs: RunNeeds, backend: Backend) -> str | None:
    if needs.colocate and not backend.fractional_devices and not needs.engine_in_trainer:
        return (
            f"--colocate puts trainer and engine processes on one device, but --hardware {backend.name} devices "
            f"({backend.ray_device_resource}) are scheduled only whole: run without --colocate, or colocate the JAX pair with one engine (it runs in the "
            "trainer's process)"
        )
    return None


def _colocate_needs_memory_saver(needs: RunNeeds, backend: Backend) -> str | None:
    # Host memory (a CPU "device" is a process) needs no releasing; an accelerator's memory does, or the
    # trainer cannot onload while the engine holds its weights and KV cache.
    # An engine in the trainer's process shares its device memory; the JAX engine frees its KV cache itself.
    accelerator = backend.ray_device_resource != "CPU"
    if needs.colocate and accelerator and not backend.capabilities.memory_saver:
        if needs.engine_in_trainer:
            return None
        return (
            f"--colocate needs engines that release device memory, and --hardware {backend.name} has none "
            "(capabilities.memory_saver is false): run without --colocate"
        )
    return None


def _rollout_engine_offered(needs: RunNeeds, backend: Backend) -> str | None:
    engine = needs.rollout_engine
    if engine not in backend.capabilities.rollout_engines:
        offered = ", ".join(backend.capabilities.rollout_engines)
        return f"rollout engine {engine!r} does not run on --hardware {backend.name} (it offers: {offered})"
    return None


def _sglang_colocate_memory_saver(needs: RunNeeds, backend: Backend) -> str | None:
    if not needs.colocate or needs.rollout_engine != "sglang":
        return None
    if not needs.sglang_memory_saver:
        return "--colocate with SGLang engines needs --sglang-enable-memory-saver (else the engine keeps its memory)"
    return None


def _moe_dispatcher_offered(needs: RunNeeds, backend: Backend) -> str | None:
    dispatcher = needs.moe_dispatcher
    if dispatcher is not None and dispatcher not in backend.capabilities.moe_dispatchers:
        offered = ", ".join(backend.capabilities.moe_dispatchers)
        return f"--moe-token-dispatcher-type {dispatcher} is not available on --hardware {backend.name} (use one of: {offered})"
    return None


def _default_weight_sync_offered(needs: RunNeeds, backend: Backend) -> str | None:
    if not backend.capabilities.weight_sync:
        return f"--hardware {backend.name} declares no weight-sync transport: the engines could never get new weights"
    return None


RULES: list[Callable[[RunNeeds, Backend], str | None]] = [
    _colocate_needs_split_devices,
    _colocate_needs_memory_saver,
    _rollout_engine_offered,
    _sglang_colocate_memory_saver,
    _moe_dispatcher_offered,
    _default_weight_sync_offered,
]


def check_against_capabilities(needs: RunNeeds, backend: Backend) -> list[str]:
    """One line per combination the backend cannot run; empty when the run can start."""
    return [problem for rule in RULES if (problem := rule(needs, backend)) is not None]


def require_capabilities(needs: RunNeeds, backend: Backend) -> None:
    problems = check_against_capabilities(needs, backend)
    if problems:
        raise FlagError("; ".join(problems))
