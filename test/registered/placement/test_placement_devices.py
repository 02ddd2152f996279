"""Placement on accelerators Ray believes in: every placement the loop makes, for each accelerator backend,
with Ray's own accounting (ray.init advertises GPUs and TPU chips this machine does not have; Ray assigns ids
per actor and sets the visible-devices variable). Each trainer rank, critic rank and engine must see exactly its
device and call it local index 0 (the global rank would name a device that is not there)."""

import os

import pytest
from placement_probe import CASES, case_config, check_devices, place

from slime import settings
from slime.backends import backend_for_worker
from slime.backends.capability_check import check_against_capabilities
from slime.ray import cluster
from slime.testing.ci_register import register_cpu_ci

register_cpu_ci(est_time=120, suite="base-b-test-cpu")

ACCELERATORS = ("cuda", "rocm", "tpu")


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    os.environ.update(RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled", OMP_NUM_THREADS="1")
    ray.init(
        num_cpus=16, num_gpus=8, resources={"TPU": 8}, include_dashboard=False, _node_ip_address="127.0.0.1",
        configure_logging=False, log_to_driver=False,
    )  # fmt: skip
    yield ray
    ray.shutdown()


@pytest.mark.parametrize("hardware", ACCELERATORS)
@pytest.mark.parametrize("case", list(CASES))
def test_each_worker_sees_its_own_device(ray_cluster, hardware, case):
    backend = backend_for_worker(hardware)
    config = case_config(CASES[case])
    if config.cluster.colocate and not backend.fractional_devices:
        pytest.skip("refused before Ray starts: test_colocate_refused_where_devices_are_whole")
    if settings.needs_critic(config) and "megatron" not in backend.capabilities.trainer_families:
        pytest.skip("refused before Ray starts: PPO needs a critic, which the JAX trainer family lacks")
    placed = place(config, backend)
    # rocm: Ray, not detecting AMD GPUs here, sets only CUDA_VISIBLE_DEVICES, so HIP_VISIBLE_DEVICES (checked as the
    # backend's variable) equal to the assigned id proves the worker's own mapping
    check_devices(placed, backend)
    layout = settings.run_layout(config)
    assert [len(placed.reports.get(r, [])) for r in ("actor", "critic", "engine")] == [
        len(layout.actor), len(layout.critic), len(layout.rollout),
    ]  # fmt: skip
    if config.cluster.colocate:  # engine e shares the device of trainer rank e
        for e, engine in enumerate(placed.reports["engine"]):
            assert engine["assigned"] == placed.reports["actor"][e]["assigned"]


def test_colocate_refused_where_devices_are_whole(ray_cluster):
    """Ray's TPU accounting rejects a fractional chip request; slime refuses --colocate on TPU before Ray does."""
    from ray.util.placement_group import placement_group

    backend = backend_for_worker("tpu")
    config = case_config(CASES["colocate_dp2"])
    problems = check_against_capabilities(settings.run_needs(config, backend), backend)
    assert any("--colocate" in p and "whole" in p for p in problems), problems
    layout = settings.run_layout(config)
    with pytest.raises(cluster.ClusterError, match="whole units"):
        cluster.scheduling(None, layout.actor[0], backend)

    @ray_cluster.remote
    def probe():
        return 1

    group = placement_group([{"TPU": 1, "CPU": 1}])
    try:  # what the old code asked for: Ray refuses it (the bug this guards)
        with pytest.raises(ValueError, match="TPU"):
            probe.options(resources={"TPU": 0.4}).remote()
    finally:
        ray_cluster.util.remove_placement_group(group)
