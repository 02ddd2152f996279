"""The hardware layer: what every backend answers, the registry, and detection.

This is one of only two places (with the per-hardware subpackages) allowed to name device stacks.
Probing never imports torch, jax or sglang: it reads installed-distribution metadata and device nodes,
so `slime env` is instant and works when a stack is absent or broken.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import sys
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

from slime import DISTRIBUTION
from slime.backends.pinned_source import PinnedSource
from slime.errors import UserError

# auto-detection order: the most specific accelerator wins; cpu is always last and always available.
DETECTION_ORDER: tuple[str, ...] = ("cuda", "rocm", "tpu", "cpu")


class BackendUnavailable(UserError, RuntimeError):
    """Raised with a one-line, user-facing message naming what to install."""


@dataclass(frozen=True)
class SystemView:
    """What a probe may look at. Tests swap the callables to simulate stacks being present or absent."""

    has_module: Callable[[str], bool]
    dist_version: Callable[[str], str | None]
    path_exists: Callable[[str], bool]
    list_dir: Callable[[str], list[str]]
    environ: dict[str, str]
    # the text of pip's direct_url.json for a distribution installed from a URL (git, archive, folder), else None
    dist_direct_url: Callable[[str], str | None] = lambda dist: None

    @staticmethod
    def real() -> SystemView:
        return SystemView(
            has_module=_has_module,
            dist_version=_dist_version,
            path_exists=os.path.exists,
            list_dir=_list_dir,
            environ=dict(os.environ),
            dist_direct_url=_dist_direct_url,
        )


def _has_module(name: str) -> bool:
    """Whether `name` is importable, without importing it or (for dotted names) its parent package."""
    top, _, rest = name.partition(".")
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return False
    if spec is None:
        return False
    locations = list(spec.submodule_search_locations or [])
    for part in rest.split(".") if rest else []:
        found = []
        for loc in locations:
            candidate = os.path.join(loc, part)
            if os.path.isdir(candidate):
                found.append(candidate)
            elif os.path.isfile(candidate + ".py") or any(
                f.startswith(part + ".") and f.endswith((".so", ".pyd")) for f in _list_dir(loc)
            ):
                return True
        if not found:
            return False
        locations = found
    return True


def _dist_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _dist_direct_url(dist: str) -> str | None:
    try:
        return importlib.metadata.distribution(dist).read_text("direct_url.json")
    except importlib.metadata.PackageNotFoundError:
        return None


def _list_dir(path: str) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except OSError:
        return []


@dataclass(frozen=True)
class Requirement:
    """A Python module the backend needs, with the distribution that provides it."""

    module: str
    dist: str
    note: str = ""  # how to get it when it is not a plain PyPI package


@dataclass(frozen=True)
class ProbeResult:
    name: str
    available: bool
    reason: str  # why not available ("" when available)
    missing: tuple[str, ...] = ()  # distributions to install
    devices: int = 0
    details: dict[str, str] = field(default_factory=dict)


# Weight-sync transports, from trainer to rollout engines. Hardware-neutral names: which one a backend offers
# is its own business; config validation refuses a transport the selected backend does not list.
WEIGHT_SYNC_OBJECT_STORE = "object_store"  # HF-named buckets through Ray's object store (any engine, any host)
WEIGHT_SYNC_BROADCAST = "broadcast"  # a process group from trainer rank 0 to the engines, one broadcast per bucket
WEIGHT_SYNC_IPC = "ipc"  # device-memory handles to a colocated engine (SGLang's update_weights_from_tensor)
WEIGHT_SYNC_IN_PROCESS = "in_process"  # engine and trainer share a process: parameters resharded in place


@dataclass(frozen=True)
class Capabilities:
    """What a backend can run. Config validation refuses combinations outside these before anything
    starts. In each tuple the first entry is the default that the backend picks when no flag asks."""

    trainer_families: tuple[str, ...]  # "megatron" | "jax"
    rollout_engines: tuple[str, ...]  # "embedded" | "sglang" | "sglang_jax" | "jax"
    weight_sync: tuple[str, ...]  # WEIGHT_SYNC_* above
    moe_dispatchers: tuple[str, ...]  # megatron-core moe_token_dispatcher_type values
    memory_saver: bool  # engines can release and resume device memory (colocate offload)

    def describe(self) -> dict[str, object]:
        return {
            "trainer_families": list(self.trainer_families),
            "rollout_engines": list(self.rollout_engines),
            "weight_sync": list(self.weight_sync),
            "moe_dispatchers": list(self.moe_dispatchers),
            "memory_saver": self.memory_saver,
        }


# Extras whose hardware stack needs a newer Python than slime itself: pyproject.toml's markers leave those
# packages out on older Pythons (test/registered/release/test_install_agreement.py keeps the two in step).
EXTRA_MIN_PYTHON: dict[str, tuple[int, int]] = {"tpu": (3, 12)}


def install_command(extra: str, python: tuple[int, int] | None = None) -> str:
    """`pip install 'slime-rl[<extra>]'`, saying so when this Python is too old for that extra's stack."""
    python = python or (sys.version_info.major, sys.version_info.minor)
    command = f"pip install '{DISTRIBUTION}[{extra}]'"
    needed = EXTRA_MIN_PYTHON.get(extra)
    if needed and python < needed:
        command += f" on Python >= {needed[0]}.{needed[1]} (this is {python[0]}.{python[1]})"
    return command


class Backend(ABC):
    """One hardware target. Subclasses are registered with @register_backend."""

    name: ClassVar[str]
    extra: ClassVar[str]  # pip extra: `pip install slime-rl[<extra>]`
    torch_device_type: ClassVar[str]  # the torch device type string
    dist_backend: ClassVar[str]  # torch.distributed backend name
    visible_devices_env: ClassVar[str | None]
    rollout_engine: ClassVar[str]  # the preferred engine; a run uses slime.rollout.engines.selection
    kernel_impl: ClassVar[str]  # default kernel implementation family: "torch" | "triton" | "jax"
    docker_image: ClassVar[str]
    ray_device_resource: ClassVar[str] = "GPU"  # the Ray resource that counts one device of this backend
    # Ray may hand two actors a fraction of one device (colocate); Ray's TPU accounting takes whole chips only.
    fractional_devices: ClassVar[bool] = True
    capabilities: ClassVar[Capabilities]
    requirements: ClassVar[tuple[Requirement, ...]]
    optional: ClassVar[tuple[Requirement, ...]] = ()  # reported, but not needed to be available
    # packages run from one known-good commit (no working release on the index); `slime env` checks the installed one
    pinned_sources: ClassVar[tuple[PinnedSource, ...]] = ()

    def __init__(self, system: SystemView | None = None):
        self.system = system or SystemView.real()
        self.device_index = 0  # this process's device among those it can see (set by bind_devices/setup_process)

    # ---- detection -------------------------------------------------------------------------------
    def missing(self) -> list[str]:
        """Distributions (pip names) that must be installed for this backend; empty when complete."""
        return [r.dist for r in self.requirements if not self.system.has_module(r.module)]

    def missing_optional(self) -> list[Requirement]:
        return [r for r in self.optional if not self.system.has_module(r.module)]

    @abstractmethod
    def detect_devices(self) -> tuple[int, str]:
        """(device count, reason when zero). Must not import heavy stacks."""

    def probe(self) -> ProbeResult:
        missing = tuple(self.missing())
        devices, why_no_devices = self.detect_devices()
        if devices == 0:
            return ProbeResult(self.name, False, why_no_devices, missing, 0)
        if missing:
            reason = f"missing {', '.join(missing)}: {install_command(self.extra)}"
            return ProbeResult(self.name, False, reason, missing, devices)
        return ProbeResult(self.name, True, "", (), devices)

    def is_available(self) -> bool:
        return self.probe().available

    def install_hint(self) -> str:
        return install_command(self.extra)

    # ---- runtime (these may import the stack; call only after selection) --------------------------
    def moe_dispatch_config(self, expert_comm_ranks: int = 2) -> dict[str, object]:
        """megatron-core TransformerConfig fields for MoE token dispatch on this machine: the first entry of
        `capabilities.moe_dispatchers` that can run here (packages installed; `expert_comm_ranks` = TP x EP,
        the ranks tokens travel between). The trainer applies them to MoE models."""
        for dispatcher in self.capabilities.moe_dispatchers:
            fields = self._moe_dispatcher_fields(dispatcher, expert_comm_ranks)
            if fields is not None:
                return {"moe_token_dispatcher_type": dispatcher, **fields}
        raise AssertionError(f"{self.name}: no usable MoE dispatcher among {self.capabilities.moe_dispatchers}")

    def _moe_dispatcher_fields(self, dispatcher: str, expert_comm_ranks: int) -> dict[str, object] | None:
        """Extra TransformerConfig fields for `dispatcher`, or None when it cannot run here."""
        return {}

    def torch_device(self, local_rank: int | None = None) -> str:
        """The torch device of local index `local_rank` (default: the one this process was bound to)."""
        index = self.device_index if local_rank is None else local_rank
        return self.torch_device_type if self.torch_device_type == "cpu" else f"{self.torch_device_type}:{index}"

    def setup_process(self, local_rank: int = 0) -> None:
        """Called once per worker process after selection, before any model is built. `local_rank` is the
        device's index among the devices this process sees (0 under Ray, which shows each actor only its own)."""
        self.device_index = local_rank

    # ---- devices a scheduler assigned ----------------------------------------------------------------
    def device_env(self, assigned_ids: Sequence[str]) -> dict[str, str]:
        """Variables that restrict this process to the node-local device ids a scheduler (Ray) assigned it.
        Ray sets the backend's variable itself when it recognises the hardware; setting it again is harmless."""
        if not assigned_ids or self.visible_devices_env is None:
            return {}
        return {self.visible_devices_env: ",".join(assigned_ids)}

    def local_device_index(self, assigned_ids: Sequence[str], environ: dict[str, str]) -> int:
        """Index, among the devices visible under `environ`, of the first assigned device (0 when one is visible)."""
        if not assigned_ids or self.visible_devices_env is None:
            return 0
        visible = environ.get(self.visible_devices_env)
        if visible is None:  # nothing restricts visibility: the node-local id is the index
            return int(assigned_ids[0])
        ids = [v.strip() for v in visible.split(",") if v.strip()]
        if assigned_ids[0] not in ids:
            raise BackendUnavailable(
                f"device {assigned_ids[0]} was assigned to this process but {self.visible_devices_env}={visible} hides it"
            )
        return ids.index(assigned_ids[0])

    def devices_given(self, assigned_ids: Sequence[str], environ: dict[str, str]) -> int:
        """How many devices a process that a scheduler assigned `assigned_ids` may use: those its visible-devices
        variable lists, or, when the variable is unset, all assigned (Ray unsets TPU_VISIBLE_CHIPS for an actor
        that holds every chip its node detected). 0: nothing was assigned (a CPU worker)."""
        if not assigned_ids or self.visible_devices_env is None:
            return 0
        visible = environ.get(self.visible_devices_env)
        if visible is None:
            return len(assigned_ids)
        return len([v for v in visible.split(",") if v.strip()])

    def bind_devices(self, assigned_ids: Sequence[str]) -> int:
        """Restrict this (fresh, device-untouched) process to `assigned_ids`; returns and remembers its local
        device index. Call before the device stack initialises."""
        os.environ.update(self.device_env(assigned_ids))
        self.device_index = self.local_device_index(assigned_ids, dict(os.environ))
        return self.device_index

    def prepare_megatron(self) -> None:
        """Make megatron-core usable on this hardware (only the CPU backend needs anything here)."""

    def bf16_is_native(self) -> bool:
        """Whether bfloat16 matmuls run natively here (faster than float32), so a recipe may pick --bf16."""
        return False

    def synchronize(self) -> None:
        """Wait for queued device work (no-op on CPU)."""

    def empty_cache(self) -> None:
        """Return cached device memory to the allocator/driver (colocate offload)."""

    def memory_allocated(self) -> int:
        return 0

    def serialize_ipc_tensors(self, payload: object) -> str:
        """A bucket of device tensors -> SGLang's `serialized_named_tensors` entry of memory handles (weight sync "ipc");
        only backends that list "ipc" in their capabilities implement it."""
        raise NotImplementedError(f"the {self.name} backend has no device-memory handles (weight sync 'ipc')")

    def engine_server_defaults(self, engine: str) -> dict[str, str]:
        """Server options an engine needs on this hardware, under the user's --sglang-* options (which win)."""
        return {}

    # ---- the JAX trainer family ----------------------------------------------------------------------
    def jax_process_env(self, devices: int, threads: int | None = None) -> dict[str, str]:
        """Environment a JAX process needs (set before jax is imported) to see `devices` devices; `threads`: the
        host cores its math may use (the run's core budget for its phase; None: the environment's default)."""
        return {}

    def jax_devices(self, every_process: bool = False) -> list:
        """The devices a JAX trainer process lays its mesh over: its local ones, or with `every_process` (several
        processes joined through jax.distributed, one per host) those of all the processes."""
        import jax

        return jax.devices() if every_process else jax.local_devices()

    def ray_cluster_options(self, devices_needed: int) -> dict[str, object]:
        """Extra `ray.init` arguments when slime starts a local Ray cluster that must hold `devices_needed`
        placement-group bundles (Ray detects accelerators itself; the CPU backend overrides this)."""
        return {}

    def network_env(self, interface: str) -> dict[str, str]:
        """Environment that makes this hardware's collective libraries use network `interface` (a run spanning
        hosts: the interface of the node's address). gloo serves every backend's host-side groups."""
        return {"GLOO_SOCKET_IFNAME": interface}

    def ray_actor_env(self) -> dict[str, str]:
        """Environment for every Ray worker slime starts on this backend."""
        return {"OMP_NUM_THREADS": self.system.environ.get("OMP_NUM_THREADS", "1")}

    def describe(self) -> dict[str, object]:
        return {
            "name": self.name,
            "extra": self.extra,
            "torch_device": self.torch_device_type,
            "dist_backend": self.dist_backend,
            "visible_devices_env": self.visible_devices_env,
            "rollout_engine": self.rollout_engine,
            "moe_dispatcher": self.moe_dispatch_config()["moe_token_dispatcher_type"],
            "kernel_impl": self.kernel_impl,
            "docker_image": self.docker_image,
            "ray_device_resource": self.ray_device_resource,
            "fractional_devices": self.fractional_devices,
            "capabilities": self.capabilities.describe(),
        }


_REGISTRY: dict[str, type[Backend]] = {}


def register_backend(cls: type[Backend]) -> type[Backend]:
    if cls.name in _REGISTRY:
        raise ValueError(f"backend {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def _load_builtin_backends() -> None:
    # Importing the subpackages registers them; none of them imports a device stack at module level.
    from slime.backends import cpu, cuda, rocm, tpu  # noqa: F401


def backend_names() -> tuple[str, ...]:
    _load_builtin_backends()
    return tuple(n for n in DETECTION_ORDER if n in _REGISTRY) + tuple(
        sorted(n for n in _REGISTRY if n not in DETECTION_ORDER)
    )


def get_backend_class(name: str) -> type[Backend]:
    _load_builtin_backends()
    if name not in _REGISTRY:
        raise BackendUnavailable(f"unknown hardware {name!r}; choose one of: auto, {', '.join(backend_names())}")
    return _REGISTRY[name]


def probe_all(system: SystemView | None = None) -> list[ProbeResult]:
    system = system or SystemView.real()
    return [get_backend_class(n)(system).probe() for n in backend_names()]


def backend_for_worker(name: str) -> Backend:
    """The backend the driver selected, rebuilt in a worker process by name without probing: the driver
    already checked it, and a worker may not see the devices (Ray hides them until assignment) or may run
    on a node without the driver's view."""
    return get_backend_class(name)(SystemView.real())


def select_backend(hardware: str = "auto", system: SystemView | None = None) -> Backend:
    """Resolve `--hardware`: auto = first available in DETECTION_ORDER; an explicit choice must be available."""
    system = system or SystemView.real()
    if hardware == "auto":
        for name in backend_names():
            backend = get_backend_class(name)(system)
            if backend.is_available():
                return backend
        raise BackendUnavailable("no usable hardware backend found; run `slime env` for the reasons")
    backend = get_backend_class(hardware)(system)
    result = backend.probe()
    if not result.available:
        raise BackendUnavailable(f"--hardware {hardware} is not usable: {result.reason}")
    return backend


def torch_build(system: SystemView) -> str:
    """The local-version tag of the installed torch ('cpu', 'cu128', 'rocm6.3', '' when untagged or absent)."""
    version = system.dist_version("torch")
    if version is None or "+" not in version:
        return ""
    return version.split("+", 1)[1]
