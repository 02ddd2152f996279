"""NVIDIA backend: CUDA torch, NCCL, SGLang rollout, Triton kernels, DeepEP MoE dispatch when present."""

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
class CudaBackend(TorchGpuBackend):
    name = "cuda"
    extra = "cuda"
    torch_device_type = "cuda"
    dist_backend = "nccl"
    visible_devices_env = "CUDA_VISIBLE_DEVICES"
    rollout_engine = "sglang"
    kernel_impl = "triton"
    docker_image = "ghcr.io/slime-rl/slime:latest-cuda"  # release/images.py: image_tags
    capabilities = Capabilities(
        trainer_families=("megatron",),
        rollout_engines=("sglang", "embedded"),
        weight_sync=(WEIGHT_SYNC_BROADCAST, WEIGHT_SYNC_IPC, WEIGHT_SYNC_OBJECT_STORE),
        moe_dispatchers=("flex", "alltoall"),
        memory_saver=True,
    )
    requirements = (
        Requirement("torch", "torch"),
        Requirement("megatron.core", "megatron-core"),
        Requirement("sglang", "sglang"),
        Requirement("triton", "triton"),
        Requirement("ray", "ray"),
    )
    optional = (
        Requirement("deep_ep", "deep_ep", note="DeepEP is not on PyPI: it ships in the slime CUDA image"),
        Requirement("sglang_router", "sglang-router"),
    )

    def detect_devices(self) -> tuple[int, str]:
        gpus = self.system.list_dir("/proc/driver/nvidia/gpus")
        if not gpus:
            gpus = [d for d in self.system.list_dir("/dev") if d.startswith("nvidia") and d[6:].isdigit()]
        if not gpus:
            return 0, "no NVIDIA GPU found (no /proc/driver/nvidia/gpus, no /dev/nvidiaN)"
        visible = self.system.environ.get(self.visible_devices_env or "")
        count = len(gpus) if visible is None else len([v for v in visible.split(",") if v.strip()])
        if count == 0:
            return 0, f"{self.visible_devices_env} hides every GPU"
        build = torch_build(self.system)
        if build == "cpu" or build.startswith("rocm"):
            return 0, f"installed torch is the {build} build; install a CUDA build of torch"
        return count, ""

    def _moe_dispatcher_fields(self, dispatcher: str, expert_comm_ranks: int) -> dict[str, object] | None:
        # megatron's flex dispatcher over DeepEP (it needs TP x EP > 1); otherwise the next entry (all-to-all)
        if dispatcher == "flex":
            usable = self.system.has_module("deep_ep") and expert_comm_ranks > 1
            return {"moe_flex_dispatcher_backend": "deepep"} if usable else None
        return {}
