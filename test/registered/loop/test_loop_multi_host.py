"""The loop across separate network hosts (slime.testing.hosts): a Ray head on host 0 with no devices, where
`slime train --ray-address` runs (the driver and the rollout manager), and three one-device hosts for the
trainer and two embedded engines. Rollouts go over HTTP between hosts, weights by broadcast (gloo) between
hosts, megatron's gloo group spans two hosts with DP 2. A lost engine host: the run finishes on the other engine
with every sample once. A lost trainer host: one line naming it and the last checkpoint, exit 4; `--load`
resumes to the end. The helper leaves no process, namespace or interface behind."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from loop_helpers import base_flags, build_task, dumped

from slime.testing.ci_register import register_cpu_ci
from slime.testing.hosts import HostsUnavailable, NodeResources, TestHosts, check_can_make_hosts, start_ray

register_cpu_ci(est_time=240, suite="base-c-test-cpu")

HERE = Path(__file__).parent
NODES = [NodeResources(0), NodeResources(1), NodeResources(1), NodeResources(1)]  # head, then one device each
NODE_ENV = {
    "OMP_NUM_THREADS": "1",
    "PYTHONPATH": str(HERE),  # the workers import this folder's plugins by dotted path
    # a lost host is declared dead within ~3 s instead of Ray's default ~30 s
    "RAY_health_check_initial_delay_ms": "1000",
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "3",
}
RUN_TIMEOUT_S = 420


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    try:
        check_can_make_hosts()
    except HostsUnavailable as e:
        pytest.skip(str(e))
    files = build_task(tmp_path_factory.mktemp("task"))
    hosts = TestHosts(len(NODES))
    with hosts:
        address = start_ray(hosts, NODES, NODE_ENV)
        yield hosts, address, files
    assert hosts.leftovers() == []


def slime_train(hosts: TestHosts, address: str, files, out: Path, **flags) -> subprocess.CompletedProcess:
    """`slime train` on the head's host, as a user of a cluster runs it."""
    argv = base_flags(files, out, **{"ray-address": address, "weight-sync": "broadcast", **flags})
    command = [str(Path(sys.executable).with_name("slime")), "train", *argv]
    return hosts[0].run(command, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, env=_env())


def _env() -> dict[str, str]:
    import os

    return {**os.environ, "PYTHONPATH": str(HERE)}


def host_lines(done: subprocess.CompletedProcess) -> str:
    return next(line for line in done.stderr.splitlines() if line.startswith("hosts: "))


def metric_rows(out: Path) -> list[dict]:
    from loop_helpers import rows

    return rows(out)


def test_five_steps_across_three_hosts(cluster, tmp_path):
    hosts, address, files = cluster
    done = slime_train(hosts, address, files, tmp_path / "run", **{"ci-test": True, "num-rollout": 5,
                       "rollout-num-gpus": 2, "save": tmp_path / "ckpt", "save-interval": 5})  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    line = host_lines(done)
    trainer, engines = line.split("; ")[0].split()[-1], line.split("; ")[1].split()[1:]
    assert len({trainer, *[e.rstrip(",") for e in engines]}) == 3, line  # three hosts, none the driver's
    assert hosts[0].address not in line and "servers bind node" in line
    assert len(metric_rows(tmp_path / "run")) == 5
    assert (tmp_path / "ckpt" / "step_00000005").is_dir()


def test_data_parallel_trainer_over_two_hosts(cluster, tmp_path):
    hosts, address, files = cluster
    flags = {
        "actor-num-nodes": 2,
        "actor-num-gpus-per-node": 1,
        "micro-batch-size": 8,
        "num-rollout": 2,
        "ci-test": True,
    }
    done = slime_train(hosts, address, files, tmp_path / "run", **flags)
    assert done.returncode == 0, done.stderr[-3000:]
    trainers = host_lines(done).split("; ")[0].removeprefix("hosts: trainer ").split(", ")
    assert len(trainers) == 2 and hosts[0].address not in trainers
    assert len(metric_rows(tmp_path / "run")) == 2


def test_engine_host_lost_mid_rollout(cluster, tmp_path):
    hosts, address, files = cluster
    dumps = tmp_path / "dumps"
    flags = {"rollout-num-gpus": 2, "custom-generate-function-path": "loop_plugins.generate_losing_the_last_engine_host_once",
             "save-debug-rollout-data": dumps, "ci-test": True}  # fmt: skip
    done = slime_train(hosts, address, files, tmp_path / "run", **flags)
    try:
        assert done.returncode == 0, done.stderr[-3000:]
        assert "is lost: its host is down (host " in done.stderr and "going on with the other 1" in done.stderr
        assert [r["rollout/engines_lost"] for r in metric_rows(tmp_path / "run")] == [1.0, 0.0, 0.0]
        batches = dumped(dumps)
        assert sorted(s["index"] for b in batches for s in b) == list(range(48))  # every sample once
        assert [{s["weight_version"] for s in b} for b in batches] == [{0}, {1}, {2}]
    finally:
        _replace_lost_hosts(hosts, address)


def test_trainer_host_lost_stops_with_one_line_and_resumes(cluster, tmp_path):
    hosts, address, files = cluster
    out, ckpt = tmp_path / "run", tmp_path / "ckpt"
    flags = {"rollout-num-gpus": 2, "num-rollout": 5, "save": ckpt, "save-interval": 1}
    argv = base_flags(files, out, **{"ray-address": address, "weight-sync": "broadcast", **flags})
    run = hosts[0].popen([str(Path(sys.executable).with_name("slime")), "train", *argv], env=_env(),
                         stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)  # fmt: skip
    try:
        _wait_for(lambda: (ckpt / "step_00000002").is_dir() or run.poll() is not None)
        trainer = _host_running(hosts, "TrainerWorker")
        hosts[trainer].kill()
        _, stderr = run.communicate(timeout=RUN_TIMEOUT_S)
    finally:
        run.kill()
        _replace_lost_hosts(hosts, address)
    last = stderr.strip().splitlines()[-1]
    assert run.returncode == 4, stderr[-3000:]
    assert last.startswith("error: actor rank 0 on host ") and hosts[trainer].address in last, last
    assert f"resume with --load {ckpt}" in last and "last checkpoint" in last, last
    resumed = slime_train(hosts, address, files, out, **{**flags, "load": ckpt})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [r["step"] for r in metric_rows(out)][-1] == 4


def _wait_for(condition, timeout_s: float = RUN_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def _host_running(hosts: TestHosts, name: str) -> int:
    """The index of the host with a process whose command line names `name` (Ray titles actors by class)."""
    for host in hosts.hosts:
        for pid in host.processes():
            try:
                if name in Path(f"/proc/{pid}/cmdline").read_text():
                    return host.index
            except OSError:
                continue
    raise AssertionError(f"no host runs {name}")


def _replace_lost_hosts(hosts: TestHosts, address: str) -> None:
    """Bring back every device host that went down (a new machine at its address joins the cluster)."""
    from slime.testing.hosts import start_ray_node

    for host, node in zip(hosts.hosts[1:], NODES[1:]):
        if host.holder.poll() is not None:
            start_ray_node(hosts.replace(host.index), node, address, NODE_ENV)
