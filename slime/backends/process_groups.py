"""Process groups outside the trainer's world, for weight sync: trainer rank 0 plus the rollout engines.

torch.distributed's default group belongs to the trainer (or to an SGLang server's own ranks), so the weight
group is built beside it from its own TCP store, as a ProcessGroup object of the hardware's collective library.
SGLang does the same on its side of `/init_weights_update_group`; the embedded engine does it here.
"""

from __future__ import annotations

import datetime

# The collective libraries a weight group may use, by the `backend` string of SGLang's request.
GROUP_BACKENDS = ("gloo", "nccl")
DEFAULT_GROUP_BACKEND = "nccl"  # what SGLang's InitWeightsUpdateGroupReqInput assumes when `backend` is absent


class GroupError(RuntimeError):
    """A weight group could not be formed or a collective on it failed (timeout, peer gone)."""


def host_store(world_size: int, timeout_s: float):
    """Rank 0's rendezvous store on a port the system picks (no race for a "free" port); returns (store, port).
    It does not wait here for the other ranks: they are told the port first, then everyone opens the group."""
    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=timeout_s)
    try:
        store = dist.TCPStore("0.0.0.0", 0, world_size, True, timeout=timeout, wait_for_workers=False)
    except RuntimeError as e:
        raise GroupError(f"weight group store did not start: {str(e).splitlines()[0] if str(e) else e!r}") from None
    return store, store.port


def open_group(
    backend: str,
    master_address: str,
    master_port: int,
    rank: int,
    world_size: int,
    group_name: str,
    timeout_s: float,
    store=None,
):
    """Join (rank > 0) or host (rank 0, with the store from host_store) the group; returns once all `world_size`
    members have joined."""
    import torch.distributed as dist

    if backend not in GROUP_BACKENDS:
        raise GroupError(f"weight group backend {backend!r} is not one of {', '.join(GROUP_BACKENDS)}")
    timeout = datetime.timedelta(seconds=timeout_s)
    try:
        if store is None:
            store = dist.TCPStore(master_address, master_port, world_size, rank == 0, timeout=timeout)
        prefixed = dist.PrefixStore(group_name, store)
        if backend == "gloo":
            return dist.ProcessGroupGloo(prefixed, rank, world_size, timeout)
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        return dist.ProcessGroupNCCL(prefixed, rank, world_size, options)
    except (RuntimeError, ValueError) as e:  # torch raises DistStoreError (a RuntimeError) on timeouts
        raise GroupError(
            f"weight group {group_name!r} ({backend}, rank {rank} of {world_size} at {master_address}:{master_port}) "
            f"did not form: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
        ) from None


def broadcast(group, tensors: list, src: int = 0) -> None:
    """Broadcast each tensor from `src` (in order), waiting for all; a timeout or lost peer is a GroupError."""
    import torch.distributed as dist

    options = dist.BroadcastOptions()
    options.rootRank = src
    try:
        works = [group.broadcast([t], options) for t in tensors]
        for work in works:
            work.wait()
    except RuntimeError as e:
        raise GroupError(f"weight broadcast failed: {str(e).splitlines()[0] if str(e) else 'RuntimeError'}") from None
