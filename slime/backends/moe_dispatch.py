"""The one switch for MoE token dispatch: DeepEP through megatron-core's flex dispatcher on NVIDIA GPUs when
deep_ep is installed, all-to-all everywhere else.

`choose_moe_dispatch(backend)` says which and why, and gives the megatron-core TransformerConfig fields;
`make_token_dispatcher` builds slime's own dispatcher with the same choice (slime.kernels.moe_dispatch interface).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from slime.backends.base import Backend

if TYPE_CHECKING:
    import torch.distributed as dist

    from slime.kernels.moe_dispatch import TokenDispatcher

DEEPEP_MODULE = "deep_ep"


@dataclass(frozen=True)
class MoeDispatchChoice:
    dispatcher: str  # megatron-core moe_token_dispatcher_type: "alltoall" | "flex"
    flex_backend: str | None  # "deepep" with the flex dispatcher
    reason: str

    def megatron_config(self) -> dict[str, object]:
        """TransformerConfig fields for this choice."""
        if self.dispatcher == "flex":
            return {"moe_token_dispatcher_type": "flex", "moe_flex_dispatcher_backend": self.flex_backend}
        return {"moe_token_dispatcher_type": self.dispatcher}


def choose_moe_dispatch(backend: Backend) -> MoeDispatchChoice:
    if backend.moe_dispatcher == "flex":
        if backend.system.has_module(DEEPEP_MODULE):
            return MoeDispatchChoice("flex", "deepep", f"{backend.name}: deep_ep installed")
        return MoeDispatchChoice("alltoall", None, f"{backend.name}: deep_ep not installed, all-to-all instead")
    return MoeDispatchChoice(backend.moe_dispatcher, None, f"{backend.name}: {backend.moe_dispatcher} by default")


def make_token_dispatcher(
    backend: Backend, num_experts: int, group: dist.ProcessGroup | None = None
) -> TokenDispatcher:
    choice = choose_moe_dispatch(backend)
    if choice.dispatcher == "flex":
        from slime.backends.cuda.deepep_dispatch import DeepEPTokenDispatcher

        return DeepEPTokenDispatcher(num_experts, group)
    from slime.kernels.moe_dispatch import AllToAllTokenDispatcher

    return AllToAllTokenDispatcher(num_experts, group)
