"""Fully asynchronous generation (--fully-async): the engines never wait for the trainer.

`GroupStream` keeps prompt groups generating all the time: as soon as one finishes (and is scored and passes the
dynamic filter) its place is taken by the next prompt. Finished groups wait in `ready`. Each train step takes
the first `num_groups` of them (`take`), in the order they finished; the weights change under the groups still
generating, between two decode steps, and every token keeps the version it was sampled under
(`Sample.token_versions`).

Staleness: a group is as old as the first token of its oldest sample. One whose first token is more than
`max_staleness` versions older than the weights being trained is not trained on: it goes back to the data source
from its prompt and is generated again (counted in `rollout/groups_regenerated_stale`), so no prompt is lost.
A new group starts only while the groups started so far number at most (versions since the start + max_staleness
+ 1) batches: taken in the order they finish, groups are then trained within max_staleness versions of their
start, and none is generated only to go stale (once the engines are that far ahead, they wait for the trainer).

Checkpoints (`state_dict`): the data position after every group drawn so far, with every group drawn but not yet
trained put back as a fresh prompt first in line: a resumed run generates those again and trains nothing twice.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from slime.rollout import reward_checks
from slime.rollout.data import DataSource, reset_to_prompt, sample_from_dict, sample_to_dict
from slime.rollout.rollout import GroupCounts, RolloutStats, keeps, rollout_metrics
from slime.types import Sample

RunGroup = Callable[[list[Sample]], Awaitable[list[Sample]]]


def group_staleness(group: list[Sample], version: int) -> int:
    """How many versions before `version` the group's first token was sampled."""
    firsts = [s.first_version for s in group if s.first_version is not None]
    return version - min(firsts) if firsts else 0


class GroupStream:
    def __init__(
        self, ctx, data: DataSource, run_group: RunGroup, batch_groups: int, max_staleness: int, filter_fn=None
    ):
        self.ctx, self.data, self.run_group, self.filter_fn = ctx, data, run_group, filter_fn
        self.batch_groups, self.max_staleness = batch_groups, max_staleness
        self.start_version = ctx.weight_version
        self.started = 0  # groups started (sent back stale ones not counted: they start again)
        self.running: dict[asyncio.Task, list[Sample]] = {}
        self.ready: list[list[Sample]] = []
        self.stats, self.counts = RolloutStats(), GroupCounts()
        self.regenerated = 0  # groups sent back for staleness since the last take
        self.idle_s = 0.0  # seconds with nothing generating since the last take
        self._idle_since: float | None = None
        self._changed = asyncio.Event()
        self._idle = asyncio.Event()
        self._error: BaseException | None = None
        self._task: asyncio.Task | None = None
        self._window_start = time.monotonic()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.ensure_future(self._fill())

    async def close(self) -> None:
        tasks = [*self.running, *([self._task] if self._task else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.running.clear()
        self._task = None

    async def _fill(self) -> None:
        try:
            while True:
                while self.started < self._allowed():
                    group = self.data.get_groups(1)[0]
                    self.running[asyncio.ensure_future(self.run_group(group))] = group
                    self.started += 1
                self._count_idle()
                waits = [*self.running, asyncio.ensure_future(self._changed.wait())]
                done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                waits[-1].cancel()
                self._changed.clear()
                for task in done:
                    if task in self.running:
                        self._finished(task)
        except asyncio.CancelledError:
            raise
        except BaseException as error:  # a plugin's failure, every engine gone: the next take raises it
            self._error = error
            self._changed.set()

    def _allowed(self) -> int:
        """Groups that may have started by now (see the module docstring)."""
        versions = self.ctx.weight_version - self.start_version
        return (versions + self.max_staleness + 1) * self.batch_groups

    def weights_changed(self) -> None:
        """A new version reached the engines: more groups may start."""
        self._changed.set()

    def _finished(self, task: asyncio.Task) -> None:
        group = self.running.pop(task)
        group = task.result()  # raises the group's failure
        if reward_checks.reward_failed(group) and self.ctx.config.rollout.reward_errors == "skip":
            self.counts.reward_skipped += 1
            self.started -= 1  # dropped: another may start in its place
        elif keeps(self.ctx, self.filter_fn, group):
            self.ready.append(group)
            self._changed.set()
        else:
            self.counts.filtered_out += 1
            self.started -= 1

    def _count_idle(self) -> None:
        now = time.monotonic()
        if self._idle_since is not None:
            self.idle_s += now - self._idle_since
        self._idle_since = now if not self.running else None
        if self.running:
            self._idle.clear()
        else:
            self._idle.set()

    async def idle(self) -> None:
        """Wait until nothing is generating (the engines are as far ahead as the staleness bound allows)."""
        await self._idle.wait()

    async def take(self, version: int) -> tuple[list[list[Sample]], dict[str, float]]:
        """The first `batch_groups` finished groups fresh enough for training `version`, in group order."""
        while True:
            if self._error is not None:
                raise self._error
            self._send_back_stale(version)
            if len(self.ready) >= self.batch_groups:
                break
            self._changed.clear()
            await self._changed.wait()
        batch, self.ready = self.ready[: self.batch_groups], self.ready[self.batch_groups :]
        self._changed.set()  # room for more
        batch.sort(key=lambda g: g[0].group_index)  # the same batch split over data-parallel ranks every run
        return batch, self._metrics(batch, version)

    def _send_back_stale(self, version: int) -> None:
        stale = [g for g in self.ready if group_staleness(g, version) > self.max_staleness]
        if stale:
            self.ready = [g for g in self.ready if g not in stale]
            self.data.add_back(stale)  # from the prompt, served before new prompts
            self.regenerated += len(stale)
            self.started -= len(stale)

    def _metrics(self, batch: list[list[Sample]], version: int) -> dict[str, float]:
        elapsed = time.monotonic() - self._window_start
        metrics = rollout_metrics(self.ctx, batch, self.stats, self.counts, elapsed)
        staleness = [group_staleness([s], version) for g in batch for s in g]
        tokens = [v for g in batch for s in g for v in (s.token_versions or [])]
        self._count_idle()
        metrics |= {
            "rollout/staleness_max": float(max(staleness)),
            "rollout/staleness_mean": sum(staleness) / len(staleness),
            "rollout/stale_token_fraction": sum(v < version for v in tokens) / len(tokens) if tokens else 0.0,
            "rollout/groups_regenerated_stale": float(self.regenerated),
            "rollout/groups_in_flight": float(len(self.running)),
            "perf/engine_idle_time": self.idle_s,
        }
        self.stats, self.counts, self.regenerated, self.idle_s = RolloutStats(), GroupCounts(), 0, 0.0
        self._window_start = time.monotonic()
        return metrics

    def state_dict(self) -> dict:
        """The data position with every drawn-but-untrained group first in line, from its prompt."""
        state = self.data.state_dict()
        untrained = sorted([*self.running.values(), *self.ready], key=lambda g: g[0].group_index)
        fresh = []
        for group in untrained:
            copies = [sample_from_dict(sample_to_dict(s)) for s in group]
            for sample in copies:
                reset_to_prompt(sample)
            fresh.append([sample_to_dict(s) for s in copies])
        state["buffer"] = fresh + state.get("buffer", [])
        return state
