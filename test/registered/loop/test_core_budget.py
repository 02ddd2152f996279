"""slime.cores: threads per worker per phase follow from the placement; the phase sets them on the working
thread and gives them back; a thread started after `apply` takes the budget (the embedded engine's worker)."""

import threading

import pytest
import torch

from slime.config import parse_config
from slime.cores import CoreBudget
from slime.testing.ci_register import register_cpu_ci

register_cpu_ci(est_time=5, suite="base-a-test-cpu")


def budget(**kw) -> CoreBudget:
    return CoreBudget(**{"train_procs": 1, "engine_procs": 1, **kw})


def split(b: CoreBudget, cores: int = 8) -> tuple[int, int]:
    """(train, generate) threads on a node of `cores` cores."""
    return b.threads("train", cores), b.threads("generate", cores)


def test_sync_each_side_gets_the_node():
    assert split(budget()) == (8, 8)
    assert split(budget(train_procs=2, engine_procs=4)) == (4, 2)
    assert split(budget(train_procs=16, engine_procs=9)) == (1, 1)  # never below one


def test_async_splits_the_node_between_generation_and_training():
    assert split(budget(overlapped=True)) == (6, 2)  # a third (rounded down) generates, the rest trains
    assert split(budget(overlapped=True, async_generation_cores=5, train_procs=3)) == (1, 5)
    assert split(budget(overlapped=True, async_generation_cores=8)) == (1, 7)  # training keeps one core
    assert split(budget(overlapped=True), cores=2) == (1, 1)
    assert split(budget(overlapped=True), cores=1) == (1, 1)
    # once the rollout beside it is done, a trainer rank takes what it would have without --async
    assert budget(overlapped=True, train_procs=2).threads_alone("train", 8) == 4


def test_node_cores_capped_by_the_flag_and_the_affinity():
    import os

    available = len(os.sched_getaffinity(0))
    assert budget(cores_per_node=None).node_cores() == available
    assert budget(cores_per_node=available + 100).node_cores() == available
    assert budget(cores_per_node=1).node_cores() == 1
    with pytest.raises(ValueError, match="phase 'eval'"):
        budget().threads("eval")


def test_phase_sets_and_restores_and_new_threads_inherit():
    original = torch.get_num_threads()
    b = budget(cores_per_node=1)  # one thread per phase: differs from the 3 the thread has before
    inside, seen = [], []
    try:
        torch.set_num_threads(3)
        with b.phase("train"):
            inside.append(torch.get_num_threads())
        after = torch.get_num_threads()
        b.apply("generate")
        worker = threading.Thread(target=lambda: (torch.ones(4) @ torch.ones(4), seen.append(torch.get_num_threads())))
        worker.start()
        worker.join()
    finally:
        torch.set_num_threads(original)
    assert inside == [1] and after == 3
    assert seen == [1]


def test_plan_from_the_config_and_layout():
    from slime.settings import core_budget

    base = ["--hf-checkpoint", "m", "--prompt-data", "d.jsonl", "--rm-type", "math", "--cores-per-node", "12"]
    sync = parse_config(base + ["--actor-num-gpus-per-node", "2", "--rollout-num-gpus", "3"])
    plan = core_budget(sync)
    assert (plan.train_procs, plan.engine_procs, plan.overlapped) == (2, 3, False)
    assert split(plan, plan.cores_per_node) == (6, 4)
    ppo = parse_config(base + ["--advantage-estimator", "ppo", "--async", "--async-generation-cores", "4"])
    plan = core_budget(ppo)
    assert (plan.train_procs, plan.overlapped) == (2, True)  # the critic trains beside the actor
    assert split(plan, plan.cores_per_node) == (4, 4)


def test_jax_processes_get_their_phase_budget_in_xla_flags():
    """XLA's CPU pool is fixed when the process starts: one thread is the single-threaded pool, more is the
    multi-threaded one; without a budget the environment's OMP_NUM_THREADS decides, as for torch."""
    from slime.backends import select_backend

    backend = select_backend("cpu")
    single = "--xla_cpu_multi_thread_eigen=false"
    assert single in backend.jax_process_env(1, threads=1)["XLA_FLAGS"]
    flags = backend.jax_process_env(4, threads=2)["XLA_FLAGS"]
    assert single not in flags and "--xla_force_host_platform_device_count=4" in flags
    sync, overlapped = CoreBudget(1, 1, cores_per_node=2), CoreBudget(1, 1, overlapped=True, cores_per_node=2)
    assert single not in backend.jax_process_env(1, sync.threads("train", 2))["XLA_FLAGS"]
    assert single in backend.jax_process_env(1, overlapped.threads("train", 2))["XLA_FLAGS"]
