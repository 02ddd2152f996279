"""Place a run's workers exactly as the loop does (slime.ray.actors / cluster / trainer_group / engine_worker),
without building models: the real TrainerWorker and EngineWorker actors bind their devices in __init__ and
report what they see; nothing heavier runs. Shared by the single-node and two-node placement tests."""

from __future__ import annotations

from dataclasses import dataclass, replace

from slime import settings
from slime.backends import Backend
from slime.config import Config, parse_config
from slime.ray import cluster
from slime.ray.engine_worker import place_engine_worker
from slime.ray.trainer_group import place_trainer_workers

BASE_FLAGS = ["--prompt-data", "p.jsonl", "--rm-type", "math", "--rollout-max-context-len", "64"]

# Every placement the loop makes, in few cases (each costs a Ray worker per rank and engine): disaggregated
# (all but colocate), --colocate, DP=2 (colocate, critic), TP=2, a critic, several engines. name -> flags.
CASES: dict[str, str] = {
    "colocate_dp2": "--actor-num-gpus-per-node 2 --rollout-num-gpus 2 --colocate --sglang-enable-memory-saver",
    "tp2": "--actor-num-gpus-per-node 2 --tensor-model-parallel-size 2 --rollout-num-gpus 1",
    "critic_dp2": "--advantage-estimator ppo --actor-num-gpus-per-node 2 --critic-num-gpus-per-node 2 "
    "--rollout-num-gpus 2",
    "engines4": "--actor-num-gpus-per-node 1 --rollout-num-gpus 4",
}


def case_config(flags: str, hf_checkpoint: str = "model") -> Config:
    return parse_config(["--hf-checkpoint", hf_checkpoint, *BASE_FLAGS, *flags.split()])


@dataclass
class Placed:
    """What each placed worker reported, keyed by role; bundle index of each, as the layout planned it."""

    layout: cluster.Layout
    reports: dict[str, list[dict]]  # "actor" | "critic" | "engine" -> one report per rank / engine
    master: tuple[str, int]  # the address rank 0 offers for the process group
    bundle_nodes: dict[int, str]  # layout bundle index -> IP of the node Ray reserved it on

    def bundles(self) -> list[tuple[int, dict]]:
        slots = {"actor": self.layout.actor, "critic": self.layout.critic, "engine": self.layout.rollout}
        return [(slot.bundle_index, r) for role, rs in self.reports.items() for slot, r in zip(slots[role], rs)]


def place(config: Config, backend: Backend) -> Placed:
    """Create the run's placement group and workers, collect their device reports, then remove them all."""
    import ray

    layout = settings.run_layout(config)
    group = cluster.create_placement_group(backend, layout, timeout_s=60)
    workers: dict[str, list] = {"actor": [], "critic": [], "engine": []}
    bind = cluster.run_bind_address(config.cluster.bind_address)  # as start_actors resolves it
    try:
        for role, slots in (("actor", layout.actor), ("critic", layout.critic)):
            if slots:
                trainer = replace(settings.trainer_config(config, role), bind_address=bind)
                workers[role] = place_trainer_workers(role, trainer, backend, group, slots)
        spec = replace(settings.engine_spec(config, backend), bind_address=bind)
        workers["engine"] = [place_engine_worker(spec, backend, group, slot) for slot in layout.rollout]
        reports = {role: ray.get([w.devices.remote() for w in ws], timeout=120) for role, ws in workers.items()}
        master = tuple(ray.get(workers["actor"][0].master_address.remote(), timeout=60))
        bundle_nodes = reserved_nodes(group)
    finally:
        for ws in workers.values():
            for w in ws:
                ray.kill(w)
        group.remove()
    return Placed(layout, {k: v for k, v in reports.items() if v}, master, bundle_nodes)


def reserved_nodes(placement: cluster.Placement) -> dict[int, str]:
    """Where Ray reserved each of the layout's bundles, from its own placement-group table."""
    import ray

    ip_of = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}
    tables = [ray.util.placement_group_table(g)["bundles_to_node_id"] for g in placement.groups]
    return {index: ip_of[tables[g][b]] for index, (g, b) in enumerate(placement.where)}


def check_devices(placed: Placed, backend: Backend) -> None:
    """Each worker sees exactly the one device Ray gave it and calls it local index 0; workers that share a bundle
    share a device, workers in different bundles never do; rank 0's node address is the master address."""
    device_of_bundle: dict[int, tuple[str, tuple[str, ...]]] = {}
    for bundle, r in placed.bundles():
        assert len(r["assigned"]) == 1, r
        assert r["visible"] == r["assigned"][0], f"{backend.visible_devices_env}={r['visible']}, assigned {r}"
        assert r["device_index"] == 0, r
        assert r["torch_device"] == f"{backend.torch_device_type}:0", r
        assert r["node_ip"] == placed.bundle_nodes[bundle], f"bundle {bundle} is on {placed.bundle_nodes[bundle]}: {r}"
        device = (r["node_ip"], tuple(r["assigned"]))
        assert device_of_bundle.setdefault(bundle, device) == device, f"bundle {bundle} spans two devices"
    devices = list(device_of_bundle.values())
    assert len(set(devices)) == len(devices), f"two bundles got one device: {device_of_bundle}"
    assert placed.master[0] == placed.reports["actor"][0]["node_ip"]
