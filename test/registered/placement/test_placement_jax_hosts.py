"""The JAX trainer takes every chip of its host: one process per trainer node asks Ray for all of that node's
--actor-num-gpus-per-node chips in one bundle, and lays its mesh over all of them (several nodes: one mesh over
all, through jax.distributed). Two Ray nodes on this machine (127.0.0.1, 127.0.0.2), each told it has 4 TPU chips;
Ray's own TPU accounting sets TPU_VISIBLE_CHIPS in each actor. The chips are emulated by XLA host devices
(--xla_force_host_platform_device_count), and the worker refuses to start when JAX sees fewer devices than Ray
gave it, so the mesh sizes below are what the real worker builds from what Ray set."""

import os
import socket

import pytest
from placement_probe import case_config

from slime import settings
from slime.backends import backend_for_worker
from slime.ray import cluster
from slime.ray.trainer_group import place_jax_trainer_workers
from slime.settings import trainer_config
from slime.testing.ci_register import register_cpu_ci

register_cpu_ci(est_time=60, suite="base-b-test-cpu")

SECOND_NODE = "127.0.0.2"
CHIPS = 4  # per node


def emulated(chips: int) -> dict[str, str]:
    """A JAX process on this CPU machine sees `chips` host devices in place of the chips."""
    return {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={chips}"}


def jax_config(flags: str):
    return case_config(f"--train-backend jax --rollout-num-gpus 1 {flags}")


# ---- pure: the layout and the count of devices given ------------------------------------------------------------
def test_layout_one_bundle_per_trainer_node():
    layout = settings.run_layout(jax_config("--actor-num-nodes 2 --actor-num-gpus-per-node 4"), "jax")
    assert [(s.bundle_index, s.devices) for s in layout.actor] == [(0, 4), (1, 4)]
    assert layout.bundle_devices == (4, 4, 1) and layout.num_devices == 9
    assert layout.node_groups == ((0,), (1,)) and layout.rollout == (cluster.Slot(2, 1.0),)
    megatron = settings.run_layout(jax_config("--actor-num-nodes 2 --actor-num-gpus-per-node 4"))
    assert len(megatron.actor) == 8 and megatron.bundle_devices == ()  # one rank per device, as before


def test_colocated_engines_share_their_node_bundle():
    layout = cluster.plan_layout(4, 0, 4, 1, colocate=True, actor_nodes=2, whole_node_trainer=True)
    assert layout.num_bundles == 2 and [s.bundle_index for s in layout.rollout] == [0, 0, 1, 1]


def test_devices_given_reads_the_visible_variable():
    tpu = backend_for_worker("tpu")
    assert tpu.devices_given(["0", "1", "2", "3"], {"TPU_VISIBLE_CHIPS": "0,1,2,3"}) == 4
    assert tpu.devices_given(["0", "1", "2", "3"], {}) == 4  # Ray unsets it when the actor holds the whole node
    assert tpu.devices_given(["2"], {"TPU_VISIBLE_CHIPS": "2"}) == 1
    assert backend_for_worker("cpu").devices_given([], {}) == 0


# ---- Ray ---------------------------------------------------------------------------------------------------
def _can_bind(address: str) -> bool:
    with socket.socket() as s:
        try:
            s.bind((address, 0))
        except OSError:
            return False
    return True


@pytest.fixture(scope="module")
def two_nodes():
    ray = pytest.importorskip("ray")
    pytest.importorskip("jax")
    from ray.cluster_utils import Cluster

    if not _can_bind(SECOND_NODE):
        pytest.skip(f"{SECOND_NODE} is not a local address here (run in the suite runner's network namespace)")
    os.environ.update(RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled", OMP_NUM_THREADS="1")
    node = {"num_cpus": 8, "resources": {"TPU": CHIPS}}
    ray_cluster = Cluster(
        initialize_head=True, head_node_args={**node, "node_ip_address": "127.0.0.1", "include_dashboard": False}
    )
    ray_cluster.add_node(**node, node_ip_address=SECOND_NODE)
    ray.init(address=ray_cluster.address, _node_ip_address="127.0.0.1", log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()
    ray_cluster.shutdown()


def place_trainer(
    ray, hardware: str, nodes: int, env: dict | None, colocate: bool = False
) -> tuple[list[dict], list[dict]]:
    """The JAX trainer's workers placed as TrainerGroup places them: (each one's devices, each one's mesh).
    `colocate`: with one engine (on whole-unit chips it lives in the trainer's process)."""
    backend = backend_for_worker(hardware)
    config = jax_config(f"--actor-num-nodes {nodes} --actor-num-gpus-per-node {CHIPS}")
    # the trainer's bundles alone (run_layout's, checked above, adds an engine chip these nodes have no room for)
    engines = 1 if colocate else 0
    layout = cluster.plan_layout(nodes * CHIPS, 0, engines, 1, colocate, actor_nodes=nodes, whole_node_trainer=True)
    group = cluster.create_placement_group(backend, layout, timeout_s=60)
    workers = []
    try:
        settings = trainer_config(config, "actor")
        workers = place_jax_trainer_workers("actor", settings, backend, group, layout.actor, env)
        reports = ray.get([w.devices.remote() for w in workers], timeout=120)
        address, port = ray.get(workers[0].master_address.remote(), timeout=60)
        meshes = ray.get([w.start_jax.remote(address, port) for w in workers], timeout=180)
    finally:
        for w in workers:
            ray.kill(w)
        group.remove()
    return reports, meshes


@pytest.mark.parametrize("colocate", [False, True])
def test_one_node_four_chips(two_nodes, colocate):
    (report,), (mesh,) = place_trainer(two_nodes, "tpu", nodes=1, env=emulated(CHIPS), colocate=colocate)
    assert report["assigned"] == ["0", "1", "2", "3"], report
    assert report["visible"] == "0,1,2,3" and report["given"] == CHIPS, report  # Ray's TPU_VISIBLE_CHIPS
    assert mesh == {"local": CHIPS, "global": CHIPS, "mesh": {"data": 1, "fsdp": CHIPS, "tensor": 1}}


def test_two_nodes_one_process_each(two_nodes):
    reports, meshes = place_trainer(two_nodes, "tpu", nodes=2, env=emulated(CHIPS))
    assert sorted(r["node_ip"] for r in reports) == ["127.0.0.1", SECOND_NODE], reports
    for r in reports:  # node-local ids: both nodes hand out chips 0-3
        assert r["assigned"] == ["0", "1", "2", "3"] and r["visible"] == "0,1,2,3", r
    for m in meshes:  # one mesh over both hosts' chips
        assert m == {"local": CHIPS, "global": 2 * CHIPS, "mesh": {"data": 1, "fsdp": 2 * CHIPS, "tensor": 1}}, m


def test_two_nodes_on_the_cpu_backend(two_nodes):
    """The CPU backend's own process environment (no emulation from the test): host devices per node process."""
    reports, meshes = place_trainer(two_nodes, "cpu", nodes=2, env=None)
    assert sorted(r["node_ip"] for r in reports) == ["127.0.0.1", SECOND_NODE], reports
    assert [m["global"] for m in meshes] == [2 * CHIPS, 2 * CHIPS], meshes


def test_a_mesh_smaller_than_the_chips_is_refused(two_nodes):
    """The old failure, one chip of four used, is now an error at start-up instead of a quietly small mesh."""
    with pytest.raises(two_nodes.exceptions.RayTaskError, match="Ray gave this trainer process 4 TPU.*JAX sees 1"):
        place_trainer(two_nodes, "tpu", nodes=1, env=emulated(1))


def test_more_chips_per_host_than_a_host_has(two_nodes):
    """8 chips per host on 4-chip hosts (8 in the cluster): refused at once, before any reservation or actor."""
    backend = backend_for_worker("tpu")
    layout = settings.run_layout(jax_config("--actor-num-gpus-per-node 8"), "jax")
    with pytest.raises(
        cluster.ClusterError, match=r"^--actor-num-gpus-per-node 8: .* largest node .* has 4 \(.*127.0.0.1 has 4 .*\)$"
    ):
        cluster.create_placement_group(backend, layout, timeout_s=60)
    table = two_nodes.util.placement_group_table().values()
    assert all(g["state"] == "REMOVED" for g in table), table
