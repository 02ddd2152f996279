"""Deterministic longest-processing-time-first partitioning of test files into shards."""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence


def lpt_partition(weights: Mapping[str, float], num_shards: int) -> list[list[str]]:
    """Split items into `num_shards` lists with near-equal total weight.

    Items are placed heaviest first (ties broken by name) onto the currently lightest shard (ties broken
    by shard index), so the same input always gives the same shards on every machine.
    """
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    shards: list[list[str]] = [[] for _ in range(num_shards)]
    heap = [(0.0, i) for i in range(num_shards)]
    for name in sorted(weights, key=lambda n: (-weights[n], n)):
        load, index = heapq.heappop(heap)
        shards[index].append(name)
        heapq.heappush(heap, (load + weights[name], index))
    return shards


def shard_loads(weights: Mapping[str, float], shards: Sequence[Sequence[str]]) -> list[float]:
    return [sum(weights[n] for n in shard) for shard in shards]


def balance(weights: Mapping[str, float], shards: Sequence[Sequence[str]]) -> float:
    """max shard load / mean shard load (1.0 is perfect)."""
    loads = shard_loads(weights, shards)
    mean = sum(loads) / len(loads) if loads else 0.0
    return max(loads) / mean if mean > 0 else 1.0
