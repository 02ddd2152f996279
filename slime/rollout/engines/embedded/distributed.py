"""The embedded engine's side of SGLang's distributed weight update, over the same HTTP bodies:

    POST /init_weights_update_group       {master_address, master_port, rank_offset, world_size, group_name, backend}
    POST /update_weights_from_distributed {names, dtypes, shapes, group_name, flush_cache, weight_version, ...}
    POST /destroy_weights_update_group    {group_name}

The trainer's rank 0 is rank 0 of the group and broadcasts each tensor of a bucket right after announcing the
bucket; this engine is rank `rank_offset` (one device, so no tensor-parallel ranks of its own). The engine
always takes part in every broadcast it was announced, then validates: a bad name or shape is a
WeightUpdateError after the collective, so the trainer never waits for a receiver that gave up early. While
paused, buckets are staged and applied together when the update ends (`finishes_update`), so a failed update
leaves the old weights serving. A collective that fails (timeout, trainer gone) breaks the group: it is dropped, and the
next update must set it up again; the answer says so.

The group is formed by slime.backends.process_groups, the way SGLang's own `init_custom_process_group` forms it,
so the trainer meets this engine and a real SGLang server on the same rendezvous keys (one member per process).
"""

from __future__ import annotations

import threading
from typing import Any

import torch

from slime.backends.process_groups import DEFAULT_GROUP_BACKEND, GroupError, broadcast, close_group, open_group
from slime.rollout.engines.base import EngineError, WeightUpdateError
from slime.rollout.engines.protocol import ProtocolError

DEFAULT_GROUP = "weight_update_group"  # SGLang's default group_name
DEFAULT_TIMEOUT_S = 600.0
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def _field(body: dict[str, Any], key: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
    value = body.get(key, default)
    if value is ...:
        raise ProtocolError(f"{key} is required")
    if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
        raise ProtocolError(f"{key} must be {getattr(kind, '__name__', kind)}, got {value!r}")
    return value


def parse_dtype(name: Any) -> torch.dtype:
    """SGLang sends dtype names as torch attribute names ("bfloat16"); "torch.bfloat16" is accepted too."""
    key = str(name).removeprefix("torch.")
    if key not in _DTYPES:
        raise ProtocolError(f"dtypes: {name!r} is not one of {', '.join(_DTYPES)}")
    return _DTYPES[key]


def parse_bucket(body: dict[str, Any]) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    names, dtypes, shapes = (_field(body, key, list) for key in ("names", "dtypes", "shapes"))
    if not (len(names) == len(dtypes) == len(shapes)) or not names:
        raise ProtocolError(
            f"names, dtypes and shapes must be non-empty lists of one length, got {len(names)}, {len(dtypes)}, {len(shapes)}"
        )
    bucket = []
    for name, dtype, shape in zip(names, dtypes, shapes):
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise ProtocolError(f"shapes: {shape!r} for {name!r} is not a list of sizes")
        bucket.append((str(name), parse_dtype(dtype), tuple(shape)))
    return bucket


def finishes_update(body: dict[str, Any], engine) -> bool:
    """Whether a weight bucket (/update_weights_from_tensor or _distributed) ends its update. SGLang applies
    every bucket as it arrives; this engine does too unless paused, where it stages buckets and applies them
    together at /flush_cache (or a bucket's flush_cache=true), so an update that fails half-way never serves;
    /continue_generation drops what is staged."""
    return _field(body, "flush_cache", bool, True) or not engine.paused


class WeightGroups:
    """Named weight groups this engine belongs to, and the receive side of a bucket."""

    def __init__(self, engine, timeout_s: float = DEFAULT_TIMEOUT_S):
        self.engine = engine
        self.timeout_s = timeout_s
        self._groups: dict[str, Any] = {}
        self._lock = threading.Lock()

    def init_group(self, body: dict[str, Any]) -> None:
        name = _field(body, "group_name", str, DEFAULT_GROUP)
        backend = _field(body, "backend", str, DEFAULT_GROUP_BACKEND)
        address = _field(body, "master_address", str)
        port, rank, world = (_field(body, key, int) for key in ("master_port", "rank_offset", "world_size"))
        if not 0 < rank < world:
            raise ProtocolError(f"rank_offset {rank} must be in [1, world_size {world}) (rank 0 is the trainer)")
        with self._lock:
            exists = name in self._groups
        if exists:  # as SGLang: a group is destroyed (/destroy_weights_update_group) before it is formed again
            raise EngineError(f"weight group {name!r} exists here already: destroy it before forming it again")
        try:
            group = open_group(backend, address, port, rank, world, name, self.timeout_s)
        except GroupError as e:
            raise EngineError(str(e)) from None
        with self._lock:
            self._groups[name] = (group, backend)

    def destroy(self, name: str) -> bool:
        with self._lock:
            entry = self._groups.pop(name, None)
        if entry is not None:
            close_group(entry[0])
        return entry is not None

    def receive(self, body: dict[str, Any], version: int) -> None:
        """Receive one announced bucket by broadcast from rank 0 and hand it to the engine (staged)."""
        name = _field(body, "group_name", str, DEFAULT_GROUP)
        finish = finishes_update(body, self.engine)
        if body.get("load_format") not in (None, "direct"):
            raise ProtocolError(f"load_format {body.get('load_format')!r} is not supported by this engine (use null)")
        bucket = parse_bucket(body)
        with self._lock:
            entry = self._groups.get(name)
        if entry is None:
            raise WeightUpdateError(f"weight group {name!r} is not set up here: call /init_weights_update_group first")
        group, backend = entry
        device = "cpu" if backend == "gloo" else self.engine.model.device  # gloo moves host memory only
        tensors = [torch.empty(shape, dtype=dtype, device=device) for _, dtype, shape in bucket]
        try:
            broadcast(group, tensors, src=0)
        except GroupError as e:
            self.destroy(name)
            self.engine.discard_pending_update()
            raise WeightUpdateError(
                f"{e}; the update to version {version} was dropped, the engine keeps serving version "
                f"{self.engine.weight_version}, and group {name!r} must be set up again"
            ) from None
        self.engine.update_weights_from_tensors(
            [(n, t) for (n, _, _), t in zip(bucket, tensors)], version, finish=finish
        )
