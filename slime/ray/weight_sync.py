"""Trainer -> engines weight sync: which transport a run uses, and the trainer-side senders.

Transports (`Capabilities.weight_sync`, `--weight-sync`):
- object_store: rank 0 puts HF-named buckets in Ray's object store, each packed into one byte array
  (`PackedBucket`: Ray stores a numpy array as it is and hands it back without a copy, where a list of tensors
  is pickled tensor by tensor, 3-4x slower at 16 MiB); each engine worker fetches and applies them. Works for
  any engine on any host; the rollout manager keeps the last update's refs for restarted engines.
- broadcast: SGLang's distributed update. Trainer rank 0 and every engine form one process group
  (`/init_weights_update_group`, rank 0 = trainer, engine i = rank i + 1); per bucket, rank 0 announces names,
  dtypes and shapes (`/update_weights_from_distributed`, answered once the engine has the bucket) and
  broadcasts the tensors in the same order, device to device with the backend's collective library (gloo on CPU).
- ipc: colocated engines only. Each trainer rank flattens each bucket into one device tensor and hands the engine
  on its own device a handle to it (`/update_weights_from_tensor`, load_format "flattened_bucket", SGLang's
  serialization); the engine copies from the trainer's memory.
Every call is bounded: the HTTP calls by the client's timeout, the collectives by the group's. A failed or
timed-out update raises WeightSyncError naming the engine and the version; the group is dropped and formed
again at the next update, and the engines keep serving the weights they had (the embedded engine stages
buckets and applies them at the last one; SGLang applies buckets as they arrive).
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from slime.backends.base import (
    WEIGHT_SYNC_BROADCAST,
    WEIGHT_SYNC_IN_PROCESS,
    WEIGHT_SYNC_IPC,
    WEIGHT_SYNC_OBJECT_STORE,
    Backend,
)
from slime.backends.process_groups import GroupError, broadcast, close_group, host_store, open_group
from slime.errors import FlagError
from slime.rollout.engines.base import EngineError
from slime.rollout.engines.protocol import FLATTENED_BUCKET, flatten_bucket
from slime.rollout.engines.sglang.client import SGLangClient

GROUP_NAME = "slime_weight_sync"
DESTROY_TIMEOUT_S = 10.0  # an engine that cannot answer /destroy_weights_update_group by then is gone or stuck
# Transports the loop drives; in_process belongs to the in-process JAX engines, which wire their own.
LOOP_TRANSPORTS = (WEIGHT_SYNC_OBJECT_STORE, WEIGHT_SYNC_BROADCAST, WEIGHT_SYNC_IPC)
logger = logging.getLogger(__name__)


class WeightSyncError(EngineError):
    """A weight update that did not complete; the message names the transport, the engine and the version."""


def resolve_weight_sync(asked: str, colocate: bool, backend: Backend) -> str:
    """The run's transport: `asked` (--weight-sync) unless "auto" (it must be one the backend offers), else ipc
    when `colocate` (--colocate) and offered, else the backend's first. Called before Ray starts (through
    slime.settings.chosen_weight_sync); a refusal is one line."""
    offered = backend.capabilities.weight_sync
    if asked == "auto":
        if colocate and WEIGHT_SYNC_IPC in offered:
            return WEIGHT_SYNC_IPC
        return offered[0]
    if asked not in offered:
        raise FlagError(f"--weight-sync {asked}: the {backend.name} backend offers {', '.join(offered)}")
    if asked == WEIGHT_SYNC_IN_PROCESS or asked not in LOOP_TRANSPORTS:
        raise FlagError(f"--weight-sync {asked} is for in-process engines; this loop runs engines in their own actors")
    return asked


def with_last(buckets: Iterable[list]) -> Iterator[tuple[list, bool]]:
    """(bucket, is_last) pairs: the last bucket ends the update (the engine publishes the version)."""
    iterator = iter(buckets)
    current = next(iterator, None)
    while current is not None:
        following = next(iterator, None)
        yield current, following is None
        current = following


@dataclass(frozen=True)
class PackedBucket:
    """One weight bucket as a single byte array (numpy: Ray's object store keeps it out of the pickle) and, per
    tensor, (name, dtype name, shape, byte offset). Offsets are 64-byte aligned, so every tensor is a view."""

    entries: tuple[tuple[str, str, tuple[int, ...], int], ...]
    data: Any  # numpy uint8 array; read-only when it comes out of the object store

    ALIGN = 64

    @classmethod
    def of(cls, named_tensors: list[tuple[str, Any]]) -> PackedBucket:
        import torch

        entries, offset = [], 0
        flats = [tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8) for _, tensor in named_tensors]
        for (name, tensor), flat in zip(named_tensors, flats):
            entries.append((name, str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape), offset))
            offset += -(-flat.numel() // cls.ALIGN) * cls.ALIGN
        data = torch.empty(offset, dtype=torch.uint8)
        for (*_, start), flat in zip(entries, flats):
            data[start : start + flat.numel()] = flat
        return cls(tuple(entries), data.numpy())

    def tensors(self) -> list[tuple[str, Any]]:
        """(name, tensor) views into `data` (read them; copy to keep them)."""
        import torch

        with warnings.catch_warnings():  # a read-only array: the engines copy out of it, nothing writes to it
            warnings.filterwarnings("ignore", message=".*not writable")
            data = torch.from_numpy(self.data)
        named = []
        for name, dtype_name, shape, start in self.entries:
            dtype = getattr(torch, dtype_name)
            size = torch.Size(shape).numel() * dtype.itemsize
            named.append((name, data[start : start + size].view(dtype).view(shape)))
        return named


def drain(buckets: Iterable[list]) -> None:
    """Finish a bucket iterator after a failure: its tensor-parallel gathers are collectives the other ranks
    are also running, so rank 0 must take part in all of them even when it sends nothing more."""
    for _ in buckets:
        pass


def _end_updates(clients: list[SGLangClient], version: int) -> list[str]:
    """Flush (after a complete update) and continue every engine; returns the engines that could not continue.
    A refused flush is reported here and is not an error (see SGLangClient.end_weight_update)."""
    stuck = []
    for client in clients:
        try:
            if client.end_weight_update() is False:
                logger.warning(
                    "%s kept its prefix cache after weight version %d: requests were waiting, and they re-prefill "
                    "over cache entries of the old weights",
                    client.url,
                    version,
                )
        except EngineError as e:
            stuck.append(f"{client.url}: generation did not continue after the update: {e}")
    return stuck


def _finish_update(clients: list[SGLangClient], version: int, error: WeightSyncError | None) -> None:
    """End the update on every engine; raise `error`, or a WeightSyncError if an engine was left paused."""
    stuck = _end_updates(clients, version)
    if error is not None:
        raise WeightSyncError("; ".join([str(error), *stuck])) from None
    if stuck:
        raise WeightSyncError(f"weight update to version {version}: " + "; ".join(stuck))


class BroadcastSender:
    """Trainer rank 0's side of the broadcast transport. The group is kept between updates and formed again
    when the engines change (a restart gives a new URL) or after a failure. Before forming it, the previous one
    is destroyed on every engine that may still hold it and here: SGLang refuses a second group of a name it
    has, and torch refuses one in this process."""

    def __init__(
        self, dist_backend: str, address: str, timeout_s: float, group_name: str = GROUP_NAME, bind: str | None = None
    ):
        """`address`: where the engines reach this side's store; `bind`: where it listens (default: `address`)."""
        self.dist_backend, self.address, self.timeout_s, self.group_name = dist_backend, address, timeout_s, group_name
        self.bind = bind or address
        self.group = None
        self.urls: list[str] = []

    def _clients(self, urls: list[str]) -> list[SGLangClient]:
        # HTTP waits longer than the collectives, so a stuck broadcast is reported by the engine, not cut off.
        return [SGLangClient(url, timeout_s=self.timeout_s + 30.0) for url in urls]

    def connect(self, urls: list[str]) -> None:
        if self.group is not None and urls == self.urls:
            return
        self.disconnect(urls)
        world = len(urls) + 1
        store, port = host_store(world, self.timeout_s, self.bind)
        clients = self._clients(urls)
        with ThreadPoolExecutor(len(clients)) as pool:
            joins = [
                pool.submit(c.init_weights_update_group, self.address, port, i + 1, world, self.dist_backend, self.group_name)
                for i, c in enumerate(clients)
            ]  # fmt: skip
            try:
                group = open_group(
                    self.dist_backend, self.address, port, 0, world, self.group_name, self.timeout_s, store
                )
            except GroupError as e:
                failed = [f"{c.url}: {f.exception()}" for c, f in zip(clients, joins) if f.exception() is not None]
                raise WeightSyncError(f"{e}{'; ' + '; '.join(failed) if failed else ''}") from None
            failed = [
                f"{c.url}: joining weight group failed: {j.exception()}"
                for c, j in zip(clients, joins)
                if j.exception()
            ]
        if failed:
            close_group(group)
            raise WeightSyncError("; ".join(failed))
        self.group, self.urls = group, list(urls)

    def disconnect(self, urls: list[str] = ()) -> None:
        """Destroy the group on the engines that may hold it (the last group's and `urls`) and here. An engine
        without it, or gone, is fine: there is nothing left to destroy."""
        targets = list(dict.fromkeys([*self.urls, *urls]))
        if targets:
            with ThreadPoolExecutor(len(targets)) as pool:  # an engine stuck in a collective answers nothing
                list(pool.map(self._destroy_on, targets))
        if self.group is not None:
            close_group(self.group)
        self.group, self.urls = None, []

    def _destroy_on(self, url: str) -> None:
        try:
            SGLangClient(url, timeout_s=min(self.timeout_s, DESTROY_TIMEOUT_S)).destroy_weights_update_group(
                self.group_name
            )
        except EngineError:
            pass

    def send(self, urls: list[str], buckets: Iterable[list], version: int) -> float:
        """Broadcast every bucket to every engine as weight `version`; returns seconds."""
        start = time.perf_counter()
        buckets = iter(buckets)
        clients = self._clients(urls)
        error = None
        try:
            self.connect(urls)
            for client in clients:
                client.begin_weight_update()
            with ThreadPoolExecutor(len(clients)) as pool:
                for bucket, last in with_last(buckets):
                    self._send_bucket(pool, clients, bucket, version, last)
        except EngineError as e:  # WeightSyncError included
            self.disconnect()  # formed again at the next update
            drain(buckets)
            error = (
                e
                if isinstance(e, WeightSyncError)
                else WeightSyncError(f"weight update to version {version} failed: {e}")
            )
        _finish_update(clients, version, error)
        return time.perf_counter() - start

    def _send_bucket(self, pool, clients: list[SGLangClient], bucket: list, version: int, last: bool) -> None:
        names = [name for name, _ in bucket]
        tensors = [t.detach().contiguous() for _, t in bucket]
        if self.dist_backend == "gloo":
            tensors = [t.cpu() for t in tensors]
        dtypes, shapes = [t.dtype for t in tensors], [tuple(t.shape) for t in tensors]
        announced = [
            pool.submit(c.update_weights_from_distributed, names, dtypes, shapes, version, self.group_name, last)
            for c in clients
        ]
        try:
            broadcast(self.group, tensors, src=0)
        except GroupError as e:
            answers = [f"{c.url}: {f.exception()}" for c, f in zip(clients, announced) if f.exception() is not None]
            raise WeightSyncError(
                f"weight update to version {version} failed: {e}{'; ' + '; '.join(answers) if answers else ''}"
            ) from None
        for client, answer in zip(clients, announced):
            if answer.exception() is not None:
                raise WeightSyncError(
                    f"weight update to version {version} failed at {client.url}: {answer.exception()}"
                )


def send_ipc(backend: Backend, url: str, buckets: Iterable[list], version: int, timeout_s: float) -> float:
    """Hand each bucket to the colocated engine at `url` as device-memory handles; returns seconds."""
    start = time.perf_counter()
    buckets = iter(buckets)
    client = SGLangClient(url, timeout_s=timeout_s)
    error = None
    try:
        client.begin_weight_update()
        for bucket, last in with_last(buckets):
            # the bucket's tensors stay referenced until the engine has answered (it reads them through the handles)
            payload = backend.serialize_ipc_tensors(flatten_bucket(bucket))
            client.update_weights_from_serialized([payload], version, finish=last, load_format=FLATTENED_BUCKET)
    except EngineError as e:
        drain(buckets)
        error = WeightSyncError(f"weight update to version {version} failed at {url}: {e}")
    _finish_update([client], version, error)
    return time.perf_counter() - start
