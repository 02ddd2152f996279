"""TPU backend: JAX/XLA, the built-in JAX rollout engine (sglang-jax at its known-good commit on request), JAX
kernels."""

from __future__ import annotations

from slime.backends.base import (
    WEIGHT_SYNC_IN_PROCESS,
    WEIGHT_SYNC_OBJECT_STORE,
    Backend,
    Capabilities,
    Requirement,
    register_backend,
)
from slime.backends.pinned_source import PinnedSource

# The one place the known-good sglang-jax is named. The index's newest (0.0.2) cannot serve RL: no logprobs, no
# cache flush, no in-process weight swap. This commit does all three on JAX's CPU backend with its own pins
# (jax 0.10.2, flax 0.12.4: requirements/constraints-tpu.txt). The index cannot take a git dependency in an
# extra, so [tpu] installs everything else and README / docker/tpu.Dockerfile add this commit (both checked
# against it by test/registered/release/test_install_agreement.py).
SGLANG_JAX = PinnedSource(
    dist="sglang-jax",
    repository="https://github.com/sgl-project/sglang-jax",
    commit="cddbf6f1cc33cbdd453bd8f36ff7051cf46ca176",
    subdirectory="python",
)


@register_backend
class TpuBackend(Backend):
    name = "tpu"
    extra = "tpu"
    torch_device_type = "xla"
    dist_backend = "xla"
    visible_devices_env = "TPU_VISIBLE_CHIPS"
    rollout_engine = "jax"
    kernel_impl = "jax"
    docker_image = "ghcr.io/slime-rl/slime:latest-tpu"  # release/images.py: image_tags
    ray_device_resource = "TPU"
    fractional_devices = False  # Ray accepts only whole chip counts (1, 2, 4, 8) for the TPU resource
    capabilities = Capabilities(
        trainer_families=("jax",),
        # the built-in engine first: sglang-jax serves a run only when asked (--rollout-engine sglang_jax) until a
        # release of it that works is on the index
        rollout_engines=("jax", "sglang_jax"),
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
    optional = (
        Requirement("sgl_jax", "sglang-jax", note=f"for --rollout-engine sglang_jax: {SGLANG_JAX.install_command}"),
    )
    pinned_sources = (SGLANG_JAX,)

    def detect_devices(self) -> tuple[int, str]:
        chips = [d for d in self.system.list_dir("/dev") if d.startswith("accel") and d[5:].isdigit()]
        if not chips and self.system.environ.get("TPU_ACCELERATOR_TYPE"):
            chips = [d for d in self.system.list_dir("/dev/vfio") if d.isdigit()]
        if not chips:
            return 0, "no TPU found (no /dev/accelN, no TPU VM vfio devices)"
        return len(chips), ""
