"""Peak host memory of a piece of torch work, measured from the profiler's allocator events.

torch's CPU allocator keeps no high-water mark, and tracemalloc does not see tensor storage. The profiler
with profile_memory=True records every allocation and free (bytes, signed); the running sum of those, in
order, is the memory held beyond what existed when measuring began, and its maximum is the peak extra memory.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from typing import TypeVar

import torch
from torch.profiler import ProfilerActivity, profile

T = TypeVar("T")
HOST_DEVICE_TYPE = 0  # the profiler's device type for host (cpu) memory events


def peak_extra_host_bytes(work: Callable[[], T]) -> tuple[T, int]:
    """(work(), the peak number of host bytes allocated by it beyond the starting point)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = work()
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    finally:
        os.unlink(path)
    memory_events = sorted(
        (e for e in events if e.get("name") == "[memory]" and e["args"].get("Device Type") == HOST_DEVICE_TYPE),
        key=lambda e: (e["ts"], e["args"].get("Ev Idx", 0)),
    )
    held = peak = 0
    for event in memory_events:
        held += int(event["args"]["Bytes"])
        peak = max(peak, held)
    return result, peak


def tensor_bytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)
