"""Pure parts of placement: a worker's visible-devices variables from the ids Ray assigned, its local device index,
and the capability check that refuses impossible runs before Ray starts (one line each)."""

import dataclasses

import pytest

from slime.backends import BackendUnavailable, SystemView, backend_for_worker, get_backend_class
from slime.backends.capability_check import check_against_capabilities, require_capabilities
from slime.config import ConfigError, parse_config
from slime.settings import run_needs
from slime.testing.ci_register import register_cpu_ci

register_cpu_ci(est_time=10, suite="base-a-test-cpu")

BASE = ["--hf-checkpoint", "m", "--prompt-data", "p.jsonl", "--rm-type", "math"]


def config(extra: str = ""):
    return parse_config(BASE + extra.split())


def problems_of(run, backend) -> list[str]:
    """The capability check's lines for a run config on `backend` (its needs as slime.settings reads them)."""
    return check_against_capabilities(run_needs(run, backend), backend)


# A backend's default rollout engine is the first of its engines whose package is installed, so a check built on
# this machine's packages would change with them (SGLang, installed --no-deps beside the CPU stack, makes it the
# CUDA default here; without it the default is the embedded engine). Each backend sees its own hardware's stack.
RUNTIME_MODULES = {"cuda": ("torch", "sglang"), "tpu": ("jax",), "cpu": ("torch",)}


def on_its_stack(hardware: str):
    modules = RUNTIME_MODULES[hardware]
    return get_backend_class(hardware)(dataclasses.replace(SystemView.real(), has_module=lambda m: m in modules))


@pytest.mark.parametrize(
    "hardware, variable",
    [("cuda", "CUDA_VISIBLE_DEVICES"), ("rocm", "HIP_VISIBLE_DEVICES"), ("tpu", "TPU_VISIBLE_CHIPS")],
)
def test_assigned_ids_become_the_visible_devices(hardware, variable):
    backend = backend_for_worker(hardware)
    assert backend.device_env(["3"]) == {variable: "3"}
    assert backend.device_env(["2", "5"]) == {variable: "2,5"}
    assert backend.local_device_index(["3"], {variable: "3"}) == 0
    assert backend.local_device_index(["5"], {variable: "2,5"}) == 1


def test_rocm_sets_hip_even_when_ray_set_only_cuda_visible_devices():
    """Ray without AMD detection sets CUDA_VISIBLE_DEVICES; HIP_VISIBLE_DEVICES is what ROCm reads first."""
    rocm = backend_for_worker("rocm")
    env = rocm.device_env(["1"])
    assert env == {"HIP_VISIBLE_DEVICES": "1"} and "ROCR_VISIBLE_DEVICES" not in env
    assert rocm.local_device_index(["1"], {"CUDA_VISIBLE_DEVICES": "1", **env}) == 0


def test_unrestricted_process_uses_the_node_id_and_a_hidden_device_is_an_error():
    cuda = backend_for_worker("cuda")
    assert cuda.local_device_index(["6"], {}) == 6  # Ray told not to set the variable: ids are node-local indices
    with pytest.raises(BackendUnavailable, match="hides it"):
        cuda.local_device_index(["6"], {"CUDA_VISIBLE_DEVICES": "0,1"})
    cpu = backend_for_worker("cpu")
    assert cpu.device_env([]) == {} and cpu.local_device_index([], {}) == 0 and cpu.torch_device() == "cpu"


def test_torch_device_follows_the_bound_index_not_the_rank():
    cuda = backend_for_worker("cuda")
    assert cuda.torch_device() == "cuda:0"
    cuda.device_index = 2
    assert cuda.torch_device() == "cuda:2" and cuda.torch_device(1) == "cuda:1"


def test_backend_for_worker_does_not_probe():
    """A worker on a machine the probe would reject (no GPU here) still gets the backend the driver chose."""
    assert backend_for_worker("cuda").name == "cuda"
    with pytest.raises(BackendUnavailable, match="unknown hardware"):
        backend_for_worker("npu")


def test_capability_check_refuses_impossible_runs_in_one_line():
    tpu, cuda, cpu = (on_its_stack(n) for n in ("tpu", "cuda", "cpu"))
    colocate = config("--colocate")
    # two engines beside the trainer would split TPU chips between processes; one JAX engine lives in the
    # trainer's own process (EngineSpec.hosted_by_trainer), so nothing is split
    split = config("--colocate --rollout-num-gpus 2 --actor-num-gpus-per-node 2")
    problems = problems_of(split, tpu)
    assert any("scheduled only whole" in p for p in problems) and any("memory_saver" in p for p in problems)
    assert problems_of(config("--colocate --rollout-engine jax"), tpu) == []
    assert problems_of(colocate, cpu) == []  # host memory: nothing to release
    assert problems_of(colocate, cuda) == [
        "--colocate with SGLang engines needs --sglang-enable-memory-saver (else the engine keeps its memory)"
    ]
    assert problems_of(config("--colocate --sglang-enable-memory-saver"), cuda) == []
    # megatron's moe_token_dispatcher_type is not a pass-through flag yet (a Literal field); the MoE issue adds one
    moe = dataclasses.replace(config(), megatron={"moe_token_dispatcher_type": "flex"})
    assert problems_of(moe, cuda) == []
    assert problems_of(moe, cpu) == [
        "--moe-token-dispatcher-type flex is not available on --hardware cpu (use one of: alltoall)"
    ]
    with pytest.raises(ConfigError) as error:
        require_capabilities(run_needs(split, tpu), tpu)
    assert "\n" not in str(error.value)


def test_train_refuses_before_ray_starts(tmp_path):
    """loop.train checks the config against the backend right after selecting it: no Ray, no workers."""
    import ray

    from slime.loop import train

    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "p.jsonl").write_text('{"prompt": "1+1=", "label": 2}\n')
    colocated = parse_config(
        [
            "--hf-checkpoint",
            str(tmp_path),
            "--prompt-data",
            str(tmp_path / "p.jsonl"),
            "--rm-type",
            "math",
            "--colocate",
            "--rollout-num-gpus",
            "2",
            "--actor-num-gpus-per-node",
            "2",
        ]
    )
    with pytest.raises(ConfigError, match="--colocate puts trainer and engine processes on one device"):
        train(colocated, backend_for_worker("tpu"))
    assert not ray.is_initialized()
