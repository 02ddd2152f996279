"""AMD backend: ROCm torch (exposed through torch's cuda device API), RCCL, SGLang ROCm build, Triton."""

from __future__ import annotations

from slime.backends.base import (
    WEIGHT_SYNC_BROADCAST,
    WEIGHT_SYNC_IPC,
    WEIGHT_SYNC_OBJECT_STORE,
    Capabilities,
    Requirement,
    register_backend,
    torch_build,
)
from slime.backends.torch_gpu import TorchGpuBackend


@register_backend
class RocmBackend(TorchGpuBackend):
    name = "rocm"
    extra = "rocm"
    torch_device_type = "cuda"  # HIP devices appear as torch "cuda" devices
    dist_backend = "nccl"  # torch names RCCL "nccl" on ROCm builds
    # Ray sets HIP_VISIBLE_DEVICES only when it detects AMD GPUs itself (else, for GPUs declared to it, only
    # CUDA_VISIBLE_DEVICES); device_env sets it from the ids Ray assigned either way. HIP applies it before
    # CUDA_VISIBLE_DEVICES; ROCR_VISIBLE_DEVICES stays as the node set it, since Ray's ids count the GPUs it leaves.
    visible_devices_env = "HIP_VISIBLE_DEVICES"
    rollout_engine = "sglang"
    kernel_impl = "triton"
    docker_image = "ghcr.io/slime-rl/slime:latest-rocm"  # release/images.py: image_tags
    capabilities = Capabilities(
        trainer_families=("megatron",),
        rollout_engines=("sglang", "embedded"),
        weight_sync=(WEIGHT_SYNC_BROADCAST, WEIGHT_SYNC_IPC, WEIGHT_SYNC_OBJECT_STORE),
        moe_dispatchers=("alltoall",),
        memory_saver=True,
    )
    requirements = (
        Requirement("torch", "torch", note="ROCm torch comes from the ROCm wheel index or the slime ROCm image"),
        Requirement("megatron.core", "megatron-core"),
        Requirement("sglang", "sglang", note="SGLang's ROCm build ships in the slime ROCm image, not on PyPI"),
        Requirement("triton", "triton"),
        Requirement("ray", "ray"),
    )

    def detect_devices(self) -> tuple[int, str]:
        if not self.system.path_exists("/dev/kfd"):
            return 0, "no AMD GPU found (no /dev/kfd)"
        render_nodes = [d for d in self.system.list_dir("/dev/dri") if d.startswith("renderD")]
        if not render_nodes:
            return 0, "no AMD GPU render node under /dev/dri"
        visible = self.system.environ.get("HIP_VISIBLE_DEVICES", self.system.environ.get("ROCR_VISIBLE_DEVICES"))
        count = len(render_nodes) if visible is None else len([v for v in visible.split(",") if v.strip()])
        if count == 0:
            return 0, "HIP_VISIBLE_DEVICES hides every GPU"
        build = torch_build(self.system)
        if self.system.dist_version("torch") is not None and not build.startswith("rocm"):
            return 0, f"installed torch is not a ROCm build ({build or 'default'}); use the ROCm wheel index"
        return count, ""
