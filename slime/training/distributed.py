"""Process-group setup for one trainer rank: torch.distributed + megatron's tensor/data-parallel groups."""

from __future__ import annotations

import datetime
from dataclasses import dataclass

import torch

from slime.backends import Backend


@dataclass(frozen=True)
class ParallelLayout:
    rank: int
    world_size: int
    tp_rank: int
    tp_size: int
    dp_rank: int
    dp_size: int
    ep_rank: int = 0  # expert-parallel rank and size (MoE); dense models keep 1
    ep_size: int = 1
    expert_dp_rank: int = 0  # data-parallel rank and size among the ranks that hold the same experts
    expert_dp_size: int = 1


def init_distributed(
    backend: Backend,
    rank: int,
    world_size: int,
    master_addr: str = "127.0.0.1",
    master_port: int = 29500,
    tensor_parallel_size: int = 1,
    expert_parallel_size: int = 1,
    local_rank: int | None = None,
    timeout_s: float = 600.0,
    seed: int = 1234,
    listen_fd: int | None = None,
) -> ParallelLayout:
    """Join the job's process group and build megatron's TP/DP (and expert-parallel) groups (TP ranks are
    adjacent; the expert-parallel group is carved out of the data-parallel ranks, as megatron does). `listen_fd`
    (rank 0): a socket bound to the master address, for the rendezvous store to listen on (it would listen on
    every interface otherwise)."""
    from megatron.core import parallel_state

    if world_size % tensor_parallel_size:
        raise ValueError(f"world_size={world_size} is not a multiple of tensor_parallel_size={tensor_parallel_size}")
    if (world_size // tensor_parallel_size) % expert_parallel_size:
        raise ValueError(
            f"--expert-model-parallel-size {expert_parallel_size} must divide the data-parallel size "
            f"{world_size // tensor_parallel_size} (world_size={world_size} / tensor_parallel_size={tensor_parallel_size})"
        )
    # The device index counts the devices this process sees, not the job: under Ray each rank sees only its own
    # (index 0), so the global rank would name a device that is not there. None: the index bound already.
    backend.setup_process(backend.device_index if local_rank is None else local_rank)
    backend.prepare_megatron()
    if not torch.distributed.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s)
        store = torch.distributed.TCPStore(
            master_addr, master_port, world_size, rank == 0, timeout=timeout, master_listen_fd=listen_fd
        )
        torch.distributed.init_process_group(
            backend=backend.dist_backend, store=store, rank=rank, world_size=world_size, timeout=timeout
        )
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tensor_parallel_size, expert_model_parallel_size=expert_parallel_size
        )
    seed_everything(seed)
    return current_layout()


def seed_everything(seed: int) -> None:
    """Seed torch and megatron's named RNG streams (data-parallel, tensor-parallel, expert)."""
    from megatron.core import tensor_parallel

    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def current_layout() -> ParallelLayout:
    from megatron.core import parallel_state

    return ParallelLayout(
        rank=torch.distributed.get_rank(),
        world_size=torch.distributed.get_world_size(),
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        tp_size=parallel_state.get_tensor_model_parallel_world_size(),
        dp_rank=parallel_state.get_data_parallel_rank(),
        dp_size=parallel_state.get_data_parallel_world_size(),
        ep_rank=parallel_state.get_expert_model_parallel_rank(),
        ep_size=parallel_state.get_expert_model_parallel_world_size(),
        expert_dp_rank=parallel_state.get_expert_data_parallel_rank(),
        expert_dp_size=parallel_state.get_expert_data_parallel_world_size(),
    )


def destroy_distributed() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
