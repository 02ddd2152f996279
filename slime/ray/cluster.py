"""Ray: starting (or joining) the cluster and placing the trainer, critic and rollout engines on devices.

One placement group per run holds a bundle per device, in this order: actor devices, then critic devices
(PPO), then rollout devices. With --colocate the rollout engines reuse the actor's bundles (each side takes
a fraction of the bundle's device and offloads while the other runs), so the group is only as large as the
trainer. Each trainer node's bundles (--actor-num-gpus-per-node actor ranks; the critic's likewise) are one Ray
placement group with STRICT_PACK, so adjacent ranks - a tensor-parallel group - never straddle two nodes; the
engines' bundles are one PACK group. (A single PACK group for everything, as before, let Ray put three trainer
ranks on one node and the fourth on another: a TP pair split across nodes.)

A JAX trainer is one process per host that owns all of that host's trainer devices (JAX drives every local
chip from one process; several hosts join through jax.distributed), so with `whole_node_trainer` each trainer
node is a single bundle of --actor-num-gpus-per-node devices instead of one bundle per device.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from slime.backends import Backend
from slime.errors import UserError
from slime.net import ANY, LOOPBACK, NODE

# Fraction of a device each side takes when colocated: both fit in one bundle together.
COLOCATED_SHARE = 0.4


class ClusterError(UserError, RuntimeError):
    """The cluster cannot host the run (too few devices, cannot connect); the message says what to change."""


@dataclass(frozen=True)
class Slot:
    """Where one worker goes: a bundle of the run's placement group and the share of it the worker takes."""

    bundle_index: int
    share: float
    devices: int = 1  # devices of the bundle the worker takes (a whole-node JAX trainer: all of its node's)


@dataclass(frozen=True)
class Layout:
    """Which bundle each actor rank, critic rank and rollout engine is placed in."""

    num_bundles: int
    actor: tuple[Slot, ...]
    critic: tuple[Slot, ...]
    rollout: tuple[Slot, ...]  # one slot per engine (the engine's first device)
    devices_per_engine: int
    node_groups: tuple[tuple[int, ...], ...] = ()  # bundle indices that must share one node (a trainer node each)
    bundle_devices: tuple[int, ...] = ()  # devices in each bundle (empty: one each)

    def devices_in(self, bundle_index: int) -> int:
        return self.bundle_devices[bundle_index] if self.bundle_devices else 1

    @property
    def num_devices(self) -> int:
        return sum(self.bundle_devices) if self.bundle_devices else self.num_bundles


def plan_layout(
    actor_devices: int,
    critic_devices: int,
    rollout_devices: int,
    devices_per_engine: int,
    colocate: bool,
    actor_nodes: int = 1,
    whole_node_trainer: bool = False,
) -> Layout:
    """Pure bundle arithmetic, unit-tested: see the module docstring for the order. `whole_node_trainer`: one
    trainer process per node holding all that node's trainer devices in one bundle (the JAX family)."""
    nodes = _trainer_node_groups(actor_devices, critic_devices, actor_nodes)
    if rollout_devices % devices_per_engine:
        raise ClusterError(
            f"--rollout-num-gpus {rollout_devices} is not a multiple of --rollout-num-gpus-per-engine {devices_per_engine}"
        )
    if colocate and rollout_devices > actor_devices:
        raise ClusterError(
            f"--colocate puts the rollout engines on the trainer's devices: --rollout-num-gpus {rollout_devices} "
            f"must be <= the trainer's {actor_devices}"
        )
    if whole_node_trainer:
        return _whole_node_layout(
            actor_devices, critic_devices, rollout_devices, devices_per_engine, colocate, actor_nodes
        )
    engines = rollout_devices // devices_per_engine
    share = COLOCATED_SHARE if colocate else 1.0
    actor = tuple(Slot(i, share) for i in range(actor_devices))
    critic = tuple(Slot(actor_devices + i, share) for i in range(critic_devices))
    if colocate:
        rollout = tuple(Slot(e * devices_per_engine, share) for e in range(engines))
        return Layout(actor_devices + critic_devices, actor, critic, rollout, devices_per_engine, nodes)
    first = actor_devices + critic_devices
    rollout = tuple(Slot(first + e * devices_per_engine, 1.0) for e in range(engines))
    return Layout(first + rollout_devices, actor, critic, rollout, devices_per_engine, nodes)


def _whole_node_layout(
    actor_devices: int, critic_devices: int, rollout_devices: int, devices_per_engine: int, colocate: bool, nodes: int
) -> Layout:
    """Bundle n holds trainer node n's --actor-num-gpus-per-node devices; then one bundle per rollout device
    (with --colocate the engines share the node bundle their first device falls in)."""
    if critic_devices:
        raise ClusterError("a whole-node trainer has no critic: drop --critic-num-gpus-per-node")
    per_node = actor_devices // nodes
    share = COLOCATED_SHARE if colocate else 1.0
    actor = tuple(Slot(n, share, per_node) for n in range(nodes))
    groups = tuple((n,) for n in range(nodes))
    engines = rollout_devices // devices_per_engine
    if colocate:
        rollout = tuple(Slot(e * devices_per_engine // per_node, share) for e in range(engines))
        return Layout(nodes, actor, (), rollout, devices_per_engine, groups, (per_node,) * nodes)
    rollout = tuple(Slot(nodes + e * devices_per_engine, 1.0) for e in range(engines))
    sizes = (per_node,) * nodes + (1,) * rollout_devices
    return Layout(nodes + rollout_devices, actor, (), rollout, devices_per_engine, groups, sizes)


def _trainer_node_groups(actor_devices: int, critic_devices: int, actor_nodes: int) -> tuple[tuple[int, ...], ...]:
    """The bundles of each trainer node: actor ranks [n*per, (n+1)*per), then the critic's the same way."""
    groups: list[tuple[int, ...]] = []
    for first, count in ((0, actor_devices), (actor_devices, critic_devices)):
        if count % actor_nodes:
            raise ClusterError(f"{count} trainer processes do not split evenly over --actor-num-nodes {actor_nodes}")
        per_node = count // actor_nodes
        groups += [
            tuple(range(first + n * per_node, first + (n + 1) * per_node)) for n in range(actor_nodes) if per_node
        ]
    return tuple(groups)


@dataclass(frozen=True)
class Placement:
    """The run's Ray placement groups and where each of the layout's bundles lives in them."""

    groups: tuple  # ray PlacementGroup objects (they pickle, so actors can place workers too)
    where: tuple[tuple[int, int], ...]  # layout bundle index -> (group index, bundle index in that group)

    def remove(self) -> None:
        _remove(self.groups)


def _remove(groups) -> None:
    import ray

    for group in groups:
        ray.util.remove_placement_group(group)


def ray_env(backend: Backend) -> dict[str, str]:
    env = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    env.update(backend.ray_actor_env())
    return env


def connect(backend: Backend, devices_needed: int, address: str | None = None, log_to_driver: bool = True) -> bool:
    """Join `address`, or reuse the Ray this process already joined, or start a local cluster bound to loopback.

    Ray reads its usage-statistics and token-auth switches only from the environment of the process that calls
    `ray.init`, so this is where slime's defaults for them (off, unless the user set them; README, "The two commands") are
    put into this process's environment; workers get the same through the runtime env.
    Returns True when this call started Ray (so the caller shuts it down at the end)."""
    import ray

    for key, value in ray_env(backend).items():
        os.environ.setdefault(key, value)
    if ray.is_initialized():
        return False
    runtime_env = {"env_vars": ray_env(backend)}
    if address:
        try:
            ray.init(address=address, runtime_env=runtime_env, log_to_driver=log_to_driver)
        except ConnectionError as exc:
            raise ClusterError(f"--ray-address {address}: cannot connect ({exc})") from None
        return True
    ray.init(
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        runtime_env=runtime_env,
        log_to_driver=log_to_driver,
        configure_logging=False,
        **backend.ray_cluster_options(devices_needed),
    )
    return True


def cluster_hosts() -> list[str]:
    """The addresses of the cluster's live nodes (one per host: nodes sharing a host share its address)."""
    import ray

    return sorted({n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]})


def run_bind_address(setting: str, hosts: list[str] | None = None) -> str:
    """The one place --bind-address is decided, on the driver once Ray is up: `auto` is the node's own address
    when the cluster spans hosts (a server on another host must be reachable) and loopback when it does not
    (nothing listens beyond the machine). Every worker gets the result (`node`, 0.0.0.0 or an IP). `hosts`: the
    cluster's node addresses (default: asked of Ray)."""
    hosts = cluster_hosts() if hosts is None else hosts
    if setting == "auto":
        return NODE if len(hosts) > 1 else LOOPBACK
    if setting not in (NODE, ANY) and len(hosts) > 1:
        raise ClusterError(
            f"--bind-address {setting}: the cluster spans hosts {', '.join(hosts)} and no address is every host's; "
            "use node or 0.0.0.0"
        )
    return setting


def on_this_node() -> dict:
    """`.options(...)` that keeps an actor on the driver's node (the rollout manager: it is the run's control
    side, like the driver, and must not go down with an engine or trainer host)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)}


def create_placement_group(backend: Backend, layout: Layout, timeout_s: float = 120.0) -> Placement:
    """One bundle per device ({resource: 1, CPU: 1} on accelerators): a STRICT_PACK group per trainer node, a PACK
    group for the rest. Fails with the numbers when the cluster cannot hold them."""
    import ray
    from ray.util.placement_group import placement_group

    resource = backend.ray_device_resource
    bundles = [_bundle(resource, layout.devices_in(i)) for i in range(layout.num_bundles)]
    if layout.bundle_devices:  # a whole-node trainer
        check_node_capacity(resource, max(layout.bundle_devices))
    in_node_groups = {i for group in layout.node_groups for i in group}
    rest = tuple(i for i in range(layout.num_bundles) if i not in in_node_groups)
    # Trainer nodes first, and only then the rest: reserved together, the engines' PACK group could take one
    # device on each node and leave no node with room for a whole trainer node.
    phases = [[(g, "STRICT_PACK") for g in layout.node_groups], [(rest, "PACK")] if rest else []]
    members: list[tuple[tuple[int, ...], str]] = []
    groups: list = []
    deadline = time.monotonic() + timeout_s
    for phase in phases:
        new = [placement_group([dict(bundles[i]) for i in g], strategy=strategy) for g, strategy in phase]
        members += phase
        groups += new
        ready, _ = ray.wait(
            [g.ready() for g in new], num_returns=len(new), timeout=max(0.0, deadline - time.monotonic())
        )
        if len(ready) < len(new):
            _remove(groups)
            available = ray.available_resources().get(resource, 0)
            per_node = max((len(g) for g in layout.node_groups), default=0)
            raise ClusterError(
                f"the run needs {layout.num_devices} {resource} in {layout.num_bundles} bundles (actor + critic + "
                f"rollout devices, {per_node} bundles on each trainer node) but the cluster has {available:g} free "
                f"({node_capacity(resource)}); lower --actor-num-gpus-per-node / --rollout-num-gpus or use --colocate"
            )
    where = {index: (gi, bi) for gi, (g, _) in enumerate(members) for bi, index in enumerate(g)}
    placement = Placement(tuple(groups), tuple(where[i] for i in range(layout.num_bundles)))
    return placement


def node_capacity(resource: str) -> str:
    """Each live node's address and how much of `resource` it has, for messages: "198.18.0.11 has 1 GPU, ..."."""
    import ray

    nodes = sorted((n["NodeManagerAddress"], n["Resources"].get(resource, 0)) for n in ray.nodes() if n["Alive"])
    return ", ".join(f"{address} has {count:g} {resource}" for address, count in nodes)


def _bundle(resource: str, devices: int) -> dict[str, float]:
    """One placement-group bundle of `devices` devices (and a CPU for the process, on accelerators)."""
    return {resource: devices} if resource == "CPU" else {resource: devices, "CPU": 1}


def check_node_capacity(resource: str, devices: int) -> None:
    """Refuse, before reserving anything, a bundle of `devices` that no node of the cluster could ever hold (a
    placement group would wait for it until its timeout)."""
    import ray

    largest = max((n["Resources"].get(resource, 0) for n in ray.nodes() if n["Alive"]), default=0)
    if devices > largest:
        raise ClusterError(
            f"--actor-num-gpus-per-node {devices}: the trainer's one process per node takes that many {resource}, "
            f"but the largest node of the cluster has {largest:g} ({node_capacity(resource)})"
        )


def scheduling(placement: Placement | None, slot: Slot, backend: Backend) -> dict:
    """`.options(...)` for an actor placed in `slot` of the run's placement."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    resource = backend.ray_device_resource
    if slot.share < 1 and not backend.fractional_devices:
        raise ClusterError(
            f"--colocate shares each device between trainer and engine, but Ray gives {resource} only in whole units "
            f"on --hardware {backend.name}; run without --colocate"
        )
    assert placement is not None
    group, index = placement.where[slot.bundle_index]
    strategy = PlacementGroupSchedulingStrategy(
        placement_group=placement.groups[group], placement_group_bundle_index=index
    )
    quantity = slot.share * slot.devices
    quantity = int(quantity) if quantity > 1 else quantity  # Ray takes quantities above one only whole
    if resource == "CPU":
        return {"scheduling_strategy": strategy, "num_cpus": quantity}
    options: dict = {"scheduling_strategy": strategy, "num_cpus": 0.1}
    if resource == "GPU":  # Ray takes GPUs only through num_gpus
        options["num_gpus"] = quantity
    else:
        options["resources"] = {resource: quantity}
    return options


def assigned_device_ids(backend: Backend) -> list[str]:
    """Node-local ids of the devices Ray assigned to the calling actor ([] for a CPU-only worker)."""
    import ray

    return [str(i) for i in ray.get_runtime_context().get_accelerator_ids().get(backend.ray_device_resource, [])]


def bind_worker_devices(backend: Backend) -> int:
    """First thing a worker does: restrict itself to the devices Ray assigned it (see Backend.bind_devices);
    returns its local device index, which is what torch calls the device (0 when one is visible)."""
    return backend.bind_devices(assigned_device_ids(backend))


def device_report(backend: Backend) -> dict:
    """What this worker was given and what it will use: the placement tests compare these with the plan."""
    import ray

    variable = backend.visible_devices_env
    return {
        "node_ip": ray.util.get_node_ip_address(),
        "assigned": assigned_device_ids(backend),
        "visible": os.environ.get(variable) if variable else None,
        "device_index": backend.device_index,
        "torch_device": backend.torch_device(),
        "pid": os.getpid(),
    }


def get_all(refs: list, timeout_s: float | None = None, what: str = "call") -> list:
    """`ray.get` of several refs that fails as soon as any of them fails: a collective whose one rank died
    must not leave the driver waiting on the ranks still blocked in it. A timeout is a ClusterError."""
    import ray

    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    pending = list(refs)
    while pending:
        wait_s = None if deadline is None else max(0.0, deadline - time.monotonic())
        ready, pending = ray.wait(pending, num_returns=1, timeout=wait_s)
        if not ready:
            raise ClusterError(
                f"{what} did not finish within {timeout_s:g} s ({len(pending)} of {len(refs)} workers still busy)"
            )
        ray.get(ready)  # raises the worker's exception
    return ray.get(list(refs))
