"""Placement across two Ray nodes on this one machine: the head at 127.0.0.1 and a second node at 127.0.0.2
(the suite runner gives each file a private network namespace whose loopback answers all of 127/8). Each node
advertises GPUs and TPU chips it does not have; the run's workers are placed as the loop places them. Checked:
every worker sees exactly its device as local index 0, devices are counted per node (two nodes may both hand out
id 0), tensor-parallel groups stay within a node, and the master address is rank 0's node address."""

import os
import socket

import pytest
from placement_probe import case_config, check_devices, place

from slime.backends import backend_for_worker
from slime.testing.ci_register import register_cpu_ci

register_cpu_ci(est_time=70, suite="base-b-test-cpu")

SECOND_NODE = "127.0.0.2"
DEVICES_PER_NODE = 3
TWO_NODE_CASES = {
    # 4 trainer ranks in TP pairs (DP 2) + 2 engines: 6 bundles, more than one node holds
    "tp2_dp2_disaggregated": "--actor-num-nodes 2 --actor-num-gpus-per-node 2 --tensor-model-parallel-size 2 "
    "--rollout-num-gpus 2",
    "dp4_colocate": "--actor-num-nodes 2 --actor-num-gpus-per-node 2 --rollout-num-gpus 4 --colocate "
    "--sglang-enable-memory-saver",
}


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
    from ray.cluster_utils import Cluster

    if not _can_bind(SECOND_NODE):
        pytest.skip(f"{SECOND_NODE} is not a local address here (run in the suite runner's network namespace)")
    os.environ.update(RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled", OMP_NUM_THREADS="1")
    devices = {"num_gpus": DEVICES_PER_NODE, "num_cpus": 8}
    tpu = {"TPU": DEVICES_PER_NODE}
    cluster = Cluster(
        initialize_head=True,
        head_node_args={**devices, "resources": tpu, "node_ip_address": "127.0.0.1", "include_dashboard": False},
    )
    cluster.add_node(**devices, resources={**tpu, "node2": 1}, node_ip_address=SECOND_NODE)
    ray.init(address=cluster.address, _node_ip_address="127.0.0.1", log_to_driver=False, configure_logging=False)
    assert {n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]} == {"127.0.0.1", SECOND_NODE}
    yield ray
    ray.shutdown()
    cluster.shutdown()


@pytest.mark.parametrize("hardware", ["cuda", "rocm", "tpu"])
@pytest.mark.parametrize("case", list(TWO_NODE_CASES))
def test_two_nodes(two_nodes, hardware, case):
    backend = backend_for_worker(hardware)
    config = case_config(TWO_NODE_CASES[case])
    if config.cluster.colocate and not backend.fractional_devices:
        pytest.skip("--colocate is refused on whole-unit devices (see test_placement_devices)")
    placed = place(config, backend)
    check_devices(placed, backend)
    nodes = {r["node_ip"] for rs in placed.reports.values() for r in rs}
    assert nodes == {"127.0.0.1", SECOND_NODE}, "six bundles cannot fit one node of three devices"
    tp = config.train.tensor_model_parallel_size
    actor = placed.reports["actor"]
    for first in range(0, len(actor), tp):
        group = {r["node_ip"] for r in actor[first : first + tp]}
        assert len(group) == 1, f"tensor-parallel ranks {first}..{first + tp - 1} span nodes {group}"
    per_node = config.cluster.actor_num_gpus_per_node
    for node in nodes:
        ranks = [i for i, r in enumerate(actor) if r["node_ip"] == node]
        assert len(ranks) % per_node == 0, f"--actor-num-gpus-per-node {per_node}, node {node} holds ranks {ranks}"
