"""CPU backend: torch on the host, gloo collectives, the embedded rollout engine (or the JAX one)."""

from __future__ import annotations

import os

from slime.backends.base import (
    WEIGHT_SYNC_BROADCAST,
    WEIGHT_SYNC_IN_PROCESS,
    WEIGHT_SYNC_OBJECT_STORE,
    Backend,
    Capabilities,
    Requirement,
    register_backend,
)


@register_backend
class CpuBackend(Backend):
    name = "cpu"
    extra = "cpu"
    torch_device_type = "cpu"
    dist_backend = "gloo"
    visible_devices_env = None
    rollout_engine = "embedded"
    kernel_impl = "torch"
    docker_image = "ghcr.io/slime-rl/slime:latest-cpu"  # release/images.py: image_tags
    # A "device" is a worker process: a bundle holds one logical CPU, and the local cluster declares as many
    # logical CPUs as the bundles need (Ray's CPU count is a scheduling quota, not a thread count).
    ray_device_resource = "CPU"
    capabilities = Capabilities(
        trainer_families=("megatron", "jax"),
        # sglang-jax on JAX's CPU backend: the TPU path's real engine, run here by --rollout-engine sglang_jax
        rollout_engines=("embedded", "jax", "sglang_jax"),
        # object store first: packed buckets took 22-33 ms a step at 4.7M parameters in the loop, broadcast over
        # gloo 58-62 ms (benchmarks/bench_vs_trl.py); broadcast stays, the GPU backends' default, tested on gloo;
        # in process: the colocated JAX pair
        weight_sync=(WEIGHT_SYNC_OBJECT_STORE, WEIGHT_SYNC_BROADCAST, WEIGHT_SYNC_IN_PROCESS),
        moe_dispatchers=("alltoall",),
        memory_saver=False,
    )
    requirements = (
        Requirement("torch", "torch"),
        Requirement("transformers", "transformers"),
        Requirement("safetensors", "safetensors"),
        Requirement("ray", "ray"),
    )
    # the default trainer family's; a run of the JAX family needs none (the TPU stack's CI environment has none)
    optional = (
        Requirement("megatron.core", "megatron-core", note="for the megatron trainer (--train-backend megatron)"),
    )

    def detect_devices(self) -> tuple[int, str]:
        return (os.cpu_count() or 1), ""

    def ray_cluster_options(self, devices_needed: int) -> dict[str, object]:
        # +1: the rollout manager and other helpers schedule beside the bundles
        return {"num_cpus": max(os.cpu_count() or 1, devices_needed + 1)}

    def setup_process(self, local_rank: int = 0) -> None:
        import torch

        super().setup_process(local_rank)
        # The default for work outside a phase (helpers, data, rewards): one intra-op thread, since several
        # workers share few cores and oversubscription measured 2-10x slower on a 2-core box. Trainer and engine
        # phases take their share of the node from the run's core budget (slime.cores) instead.
        threads = int(self.system.environ.get("OMP_NUM_THREADS", "1"))
        torch.set_num_threads(max(1, threads))

    def jax_process_env(self, devices: int, threads: int | None = None) -> dict[str, str]:
        # virtual host devices stand in for accelerators: the same mesh and sharding code runs on them
        flags = f"--xla_force_host_platform_device_count={devices}"
        if threads is None:
            threads = int(self.system.environ.get("OMP_NUM_THREADS", "1"))
        if threads == 1:
            # as for torch in setup_process: workers share few cores, so one intra-op thread each. XLA's CPU
            # client fixes its pool when the process starts, so a budget above one gets the multi-threaded pool.
            flags += " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
        return {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": flags}

    def engine_server_defaults(self, engine: str) -> dict[str, str]:
        if engine != "sglang_jax":
            return {}
        # sglang-jax's kernels are TPU kernels: on the host its "native" attention runs, without the precompile
        # pass over every batch shape (minutes on a CPU), in a KV cache of a tenth of host memory
        return {
            "device": "cpu",
            "attention_backend": "native",
            "disable_precompile": "true",
            "mem_fraction_static": "0.1",
        }

    def jax_devices(self, every_process: bool = False) -> list:
        import jax

        return jax.devices("cpu")  # every process's host devices (one process: its own)

    def bf16_is_native(self) -> bool:
        """AVX-512 BF16 or AMX: bfloat16 matmuls about 3x float32's speed at the quickstart's shapes (AMD EPYC
        with avx512_bf16); without them bfloat16 is emulated and slower."""
        import torch

        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())

    def prepare_megatron(self) -> None:
        from slime.backends.cpu import megatron_compat

        megatron_compat.apply()
