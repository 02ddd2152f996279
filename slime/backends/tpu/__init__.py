"""TPU backend: JAX/XLA, sglang-jax rollout where installed (else the built-in JAX engine), JAX kernels."""

from __future__ import annotations

from slime.backends.base import (
    WEIGHT_SYNC_IN_PROCESS,
    WEIGHT_SYNC_OBJECT_STORE,
    Backend,
    Capabilities,
    Requirement,
    register_backend,
)


@register_backend
class TpuBackend(Backend):
    name = "tpu"
    extra = "tpu"
    torch_device_type = "xla"
    dist_backend = "xla"
    visible_devices_env = "TPU_VISIBLE_CHIPS"
    rollout_engine = "sglang_jax"
    kernel_impl = "jax"
    docker_image = "ghcr.io/slime-rl/slime:latest-tpu"  # release/images.py: image_tags
    ray_device_resource = "TPU"
    fractional_devices = False  # Ray accepts only whole chip counts (1, 2, 4, 8) for the TPU resource
    capabilities = Capabilities(
        trainer_families=("jax",),
        rollout_engines=("sglang_jax", "jax"),
        weight_sync=(WEIGHT_SYNC_OBJECT_STORE, WEIGHT_SYNC_IN_PROCESS),  # in process: colocated JAX pair
        moe_dispatchers=("alltoall",),
        memory_saver=False,
    )
    requirements = (
        Requirement("jax", "jax"),
        Requirement("libtpu", "libtpu"),
        Requirement("flax", "flax"),
        Requirement("optax", "optax"),
    )
    # without it the built-in JAX engine serves rollouts (Capabilities.rollout_engines: first installed wins)
    optional = (Requirement("sgl_jax", "sglang-jax", note="sglang-jax needs Python >= 3.12"),)

    def detect_devices(self) -> tuple[int, str]:
        chips = [d for d in self.system.list_dir("/dev") if d.startswith("accel") and d[5:].isdigit()]
        if not chips and self.system.environ.get("TPU_ACCELERATOR_TYPE"):
            chips = [d for d in self.system.list_dir("/dev/vfio") if d.isdigit()]
        if not chips:
            return 0, "no TPU found (no /dev/accelN, no TPU VM vfio devices)"
        return len(chips), ""
