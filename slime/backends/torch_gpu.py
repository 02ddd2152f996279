"""What the two GPU backends share: both drive their devices through torch's `cuda` device API (ROCm torch
exposes HIP devices under that name), so device binding, synchronisation and memory calls are one code."""

from __future__ import annotations

from slime.backends.base import Backend


class TorchGpuBackend(Backend):
    """Base of the backends whose torch device type is "cuda" (NVIDIA, and AMD through HIP)."""

    def setup_process(self, local_rank: int = 0) -> None:
        import torch

        super().setup_process(local_rank)
        torch.cuda.set_device(local_rank)

    def network_env(self, interface: str) -> dict[str, str]:
        # NCCL (and RCCL, which reads the same variable) picks its own interface otherwise
        return {**super().network_env(interface), "NCCL_SOCKET_IFNAME": interface}

    def synchronize(self) -> None:
        import torch

        torch.cuda.synchronize()

    def empty_cache(self) -> None:
        import torch

        torch.cuda.empty_cache()

    def serialize_ipc_tensors(self, payload: object) -> str:
        # The module name says cuda, but the handles are torch's device-memory IPC, which ROCm torch serves too.
        from slime.backends.cuda.ipc import serialize_ipc_named_tensors

        return serialize_ipc_named_tensors(payload)

    def memory_allocated(self) -> int:
        import torch

        return int(torch.cuda.memory_allocated())
