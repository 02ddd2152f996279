"""How many cores each worker's math may use in each phase, derived from the placement (one place for it).

A worker whose peers are idle uses every core it is given: without --async the engines generate while the
trainer waits, then the trainer trains while the engines wait (colocated runs alternate the same way), so
each side gets all of its node's cores, split between the processes of that side on the node. With --async
generation and training run at the same time, so the cores are divided between the two sides by one rule:
generation keeps `--async-generation-cores` (default: a third of the node, at least one; at the quickstart's
shape generating a rollout took 0.36 s against 0.91 s for training it, about 1 : 2.5, measured with one thread
each), training gets the rest. The node's cores are the ones the process may run on (its CPU affinity),
capped by `--cores-per-node`.

Torch keeps its intra-op thread count per thread once a thread has run a parallel op, so a phase sets it on
the thread that does the work: the trainer on its actor thread around every call (`phase`), the engine
before its worker thread starts (`apply`: a new thread takes the process-wide value on its first op). Helper
processes (the rollout manager, reward and data work) keep the one thread the environment gives them
(`OMP_NUM_THREADS=1` from the backend's actor environment, .ci/run and the suite runner), so nothing
oversubscribes.

Under --async that split holds only while the engines generate. Once the rollout beside a trainer call is done,
the engines sit idle until the weights change, so the trainer takes every core it would have without --async
for the rest of the call (`CoreLease`, polled between layers on the working thread). At the TRL benchmark's
shape (8 x 8 samples, bfloat16) the rollout took 0.31 s of a 0.63 s one-thread train step; with the lease the
step went from 0.68 to 0.54 s.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

PHASES = ("train", "generate")


@dataclass(frozen=True)
class CoreBudget:
    train_procs: int  # trainer ranks (policy and critic) that train at the same time on one node
    engine_procs: int  # engine processes that generate at the same time on one node
    overlapped: bool = False  # --async: generation and training share the node's cores
    cores_per_node: int | None = None  # --cores-per-node; None: the cores this process may run on
    async_generation_cores: int | None = None  # --async-generation-cores; None: the rule in the module docstring

    def node_cores(self) -> int:
        available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        return max(1, min(available, self.cores_per_node or available))

    def generation_cores(self, cores: int) -> int:
        """Cores of the node the generating side gets (all of them unless --async)."""
        if not self.overlapped:
            return cores
        wanted = self.async_generation_cores or max(1, cores // 3)
        return max(1, min(wanted, cores - 1)) if cores > 1 else 1

    def threads(self, phase: str, cores: int | None = None) -> int:
        """Intra-op threads for one worker of `phase` ("train" or "generate") on a node of `cores` usable cores
        (default: this process's node, `node_cores`)."""
        if phase not in PHASES:
            raise ValueError(f"phase {phase!r}: expected one of {', '.join(PHASES)}")
        cores = self.node_cores() if cores is None else cores
        generation = self.generation_cores(cores)
        if phase == "generate":
            return max(1, generation // max(1, self.engine_procs))
        side = cores - generation if self.overlapped and cores > 1 else cores
        return max(1, side // max(1, self.train_procs))

    def threads_alone(self, phase: str, cores: int | None = None) -> int:
        """Threads for `phase` while the other side is idle (as without --async)."""
        return dataclasses.replace(self, overlapped=False).threads(phase, cores)

    def apply(self, phase: str) -> int:
        """Set this thread's (and later new threads') intra-op threads for `phase`; returns the count."""
        import torch

        threads = self.threads(phase)
        torch.set_num_threads(threads)
        return threads

    @contextmanager
    def phase(self, name: str):
        """Use the phase's cores inside the block, then go back to what the thread had (idle: no competition)."""
        import torch

        before = torch.get_num_threads()
        self.apply(name)
        try:
            yield
        finally:
            torch.set_num_threads(before)

    def describe(self) -> dict[str, int]:
        return {"node_cores": self.node_cores(), "train": self.threads("train"), "generate": self.threads("generate")}


class CoreLease:
    """--async: a trainer rank that started its call on its share takes every core of its side's budget without
    --async (`threads_alone`) once the rollout generating beside it is done (`done()`). `poll` runs on the working
    thread (torch's thread count is per thread); the surrounding `CoreBudget.phase` gives the thread its count
    back when the call ends."""

    def __init__(self, budget: CoreBudget, done: Callable[[], bool]):
        import torch

        self.threads = budget.threads_alone("train")
        self.done: Callable[[], bool] | None = done if self.threads > torch.get_num_threads() else None

    def poll(self) -> None:
        if self.done is not None and self.done():
            import torch

            self.done = None
            torch.set_num_threads(self.threads)
