"""Process groups outside the trainer's world, for weight sync: trainer rank 0 plus the rollout engines.

torch.distributed's default group belongs to the trainer (or to an SGLang server's own ranks), so the weight
group is built beside it over its own TCP store. Every member forms it the way SGLang's
`init_custom_process_group` does on its side of `/init_weights_update_group`: the store wrapped in
`PrefixStore(group_name)`, then torch's own group constructor under the group's name, which adds `<name>/` and
`<device>/` prefixes of its own. Rendezvous keys are therefore the ones a real SGLang server waits on (a bare
ProcessGroupGloo on `PrefixStore(group_name)` waits on others and never meets it). The keys depend on torch's
version: trainer and engines run the same torch (the images pin it).

torch registers such a group by name in its process: one member per process, and a group must be closed
(`close_group`) before one of the same name is formed again.
"""

from __future__ import annotations

import datetime

from slime.net import LOOPBACK, listening_socket

# The collective libraries a weight group may use, by the `backend` string of SGLang's request.
GROUP_BACKENDS = ("gloo", "nccl")
DEFAULT_GROUP_BACKEND = "nccl"  # what SGLang's InitWeightsUpdateGroupReqInput assumes when `backend` is absent


class GroupError(RuntimeError):
    """A weight group could not be formed or a collective on it failed (timeout, peer gone)."""


def _first_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def host_store(world_size: int, timeout_s: float, host: str = LOOPBACK):
    """Rank 0's rendezvous store, listening on `host` only, on a port the system picks (no race for a "free"
    port); returns (store, port). torch's store would listen on every interface by itself, so it is handed a
    socket already bound. It does not wait here for the other ranks: they are told the port first, then everyone
    opens the group."""
    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=timeout_s)
    try:
        sock = listening_socket(host)
        port = sock.getsockname()[1]
        store = dist.TCPStore(
            host, port, world_size, True, timeout=timeout, wait_for_workers=False, master_listen_fd=sock.detach()
        )
    except (RuntimeError, OSError) as e:
        raise GroupError(f"weight group store did not start on {host}: {_first_line(e)}") from None
    return store, port


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
    from torch.distributed.distributed_c10d import Backend, _new_process_group_helper, _world

    if backend not in GROUP_BACKENDS:
        raise GroupError(f"weight group backend {backend!r} is not one of {', '.join(GROUP_BACKENDS)}")
    where = f"weight group {group_name!r} ({backend}, rank {rank} of {world_size} at {master_address}:{master_port})"
    if group_name in _world.pg_names.values():
        raise GroupError(f"{where}: this process is in a group of that name already (close it first)")
    timeout = datetime.timedelta(seconds=timeout_s)
    try:
        if store is None:
            store = dist.TCPStore(master_address, master_port, world_size, rank == 0, timeout=timeout)
        group, _ = _new_process_group_helper(
            world_size, rank, [], Backend(backend), dist.PrefixStore(group_name, store), group_name, timeout=timeout
        )
    except (RuntimeError, ValueError) as e:  # torch raises DistStoreError (a RuntimeError) on timeouts
        raise GroupError(f"{where} did not form: {_first_line(e)}") from None
    _world.pg_group_ranks[group] = {i: i for i in range(world_size)}  # group ranks are the collective's ranks
    return group


def close_group(group) -> None:
    """Leave a group formed by open_group and free its name in this process (a broken group included)."""
    import torch.distributed as dist

    try:
        dist.destroy_process_group(group)
    except (RuntimeError, ValueError):  # already destroyed, or its backend failed while shutting down
        pass


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
        raise GroupError(f"weight broadcast failed: {_first_line(e)}") from None
