"""One rollout step: draw prompt groups, generate, reward, filter, until the batch is full.

Guarantees, each tested: every kept sample is generated exactly once into the batch (an engine failure
throws away what the failed attempt appended and retries it, never duplicates it); groups cut off by a
partial rollout go back to the data source with what they have and continue next step; surplus
over-sampled groups are discarded and counted, never reused silently.

Sampling is seeded per sample (from --rollout-seed, the sample's index and how much of it exists), so a
rollout is reproducible whatever the engine batches together, a retried request draws the same tokens,
and a resumed run generates what the uninterrupted run generated.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from slime.plugin_failures import PluginFailure, naming_rollout, plugin_call, plugin_name
from slime.rollout import generate, reward_checks
from slime.rollout.data import DataSource, reset_to_prompt
from slime.rollout.engines.base import EngineUnavailable
from slime.rollout.generate import RolloutContext, sampling_params_for
from slime.types import Sample, SampleStatus

GenerateFn = Callable[[RolloutContext, Sample, dict], Awaitable[Sample]]
FilterFn = Callable[[RolloutContext, list[Sample]], bool]
RecoverFn = Callable[[], Awaitable[None]]
MAX_BARREN_WAVES = 50  # generation waves in a row whose groups the dynamic filter all rejected


@dataclass
class RolloutResult:
    groups: list[list[Sample]]
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def samples(self) -> list[Sample]:
        return [s for g in self.groups for s in g]


@dataclass
class RewardSpec:
    rm_type: str | None
    custom_rm: Callable | None
    group_rm: bool
    remote: Any = None

    async def score_group(self, ctx: RolloutContext, group: list[Sample]) -> None:
        """Each sample's reward, checked and under --reward-errors (slime.rollout.reward_checks)."""
        await reward_checks.score_group(self, ctx, group)


@dataclass
class RolloutStats:
    engine_retries: int = 0
    generated_tokens: int = 0


def sample_seed(base_seed: int, sample: Sample) -> int:
    """A sampling seed that depends only on the run seed, the sample and how much of it is generated."""
    return (base_seed * 1_000_003 + (sample.index or 0) * 8191 + sample.response_length) % (2**31 - 1)


def seeded(params: dict, ctx: RolloutContext, sample: Sample) -> dict:
    return (
        dict(params, sampling_seed=sample_seed(ctx.config.data.rollout_seed, sample))
        if params.get("temperature", 1.0) > 0
        else params
    )


async def _with_retries(
    attempt_fn: Callable[[], Awaitable[None]],
    samples: list[Sample],
    stats: RolloutStats,
    recover: RecoverFn | None,
    max_retries: int,
) -> None:
    """Run one generation attempt for `samples`; on EngineUnavailable roll them back to where they stood
    (so nothing the failed attempt appended survives) and try again once the engine is back."""
    starts = [s.response_length for s in samples]
    for attempt in range(max_retries + 1):
        try:
            await attempt_fn()
            stats.generated_tokens += sum(s.response_length - n for s, n in zip(samples, starts))
            return
        except EngineUnavailable:
            for sample, n in zip(samples, starts):
                truncate_to(sample, n)
            stats.engine_retries += 1
            if attempt == max_retries:
                raise
            if recover is not None:
                await recover()
            else:
                await asyncio.sleep(0.5 * (attempt + 1))


async def generate_one(
    ctx: RolloutContext,
    generate_fn: GenerateFn,
    sample: Sample,
    params: dict,
    stats: RolloutStats,
    recover: RecoverFn | None = None,
    max_retries: int = 3,
) -> Sample:
    """Run the generate function on one sample, retried on engine failure; a custom one's failure is named."""
    params = seeded(params, ctx, sample)
    plugin = plugin_name("--custom-generate-function-path", generate_fn)

    async def attempt() -> None:
        if generate_fn is generate.generate:  # slime's own: an error in it is not the user's
            await generate_fn(ctx, sample, params)
            return
        with plugin_call(plugin, [sample], passthrough=(EngineUnavailable,)):
            await generate_fn(ctx, sample, params)

    await _with_retries(attempt, [sample], stats, recover, max_retries)
    return sample


async def generate_samples(
    ctx: RolloutContext,
    generate_fn: GenerateFn,
    samples: list[Sample],
    params: dict,
    stats: RolloutStats,
    recover: RecoverFn | None = None,
    max_retries: int = 3,
) -> None:
    """Generate several samples (a group): the default generate sends them as one batched request; a custom
    generate function runs once per sample, concurrently."""
    if generate_fn is generate.generate:
        batch_params = [seeded(params, ctx, s) for s in samples]
        await _with_retries(
            lambda: generate.generate_batch(ctx, samples, batch_params), samples, stats, recover, max_retries
        )
    else:
        await asyncio.gather(*(generate_one(ctx, generate_fn, s, params, stats, recover, max_retries) for s in samples))


def truncate_to(sample: Sample, response_length: int) -> None:
    if response_length == 0:
        reset_to_prompt(sample)
        return
    drop = sample.response_length - response_length
    if drop > 0:
        del sample.tokens[-drop:]
        del sample.loss_mask[-drop:]
        del sample.rollout_log_probs[-drop:]
        if sample.token_versions:
            del sample.token_versions[-drop:]
        sample.response_length = response_length
    sample.status = SampleStatus.PENDING


@dataclass
class GroupCounts:
    """What happened to the groups drawn for one rollout besides being kept."""

    filtered_out: int = 0  # rejected by the dynamic sampling filter
    discarded: int = 0  # surplus over-sampled groups, thrown away
    returned: int = 0  # cut off by a partial rollout, back in the data source with what they have
    reward_skipped: int = 0  # dropped for a reward error (--reward-errors skip)


async def generate_rollout(
    ctx: RolloutContext,
    data_source: DataSource,
    *,
    num_groups: int,
    generate_fn: GenerateFn,
    reward: RewardSpec,
    filter_fn: FilterFn | None = None,
    over_sampling_groups: int | None = None,
    partial_rollout: bool = False,
    recover: RecoverFn | None = None,
    max_engine_retries: int = 3,
) -> RolloutResult:
    params = sampling_params_for(ctx.config)
    stats, counts = RolloutStats(), GroupCounts()
    kept: list[list[Sample]] = []
    start = time.monotonic()

    async def run_group(group: list[Sample]) -> list[Sample]:
        # Samples of a group handed back by a partial rollout may be finished already: only the rest run.
        todo = [s for s in group if s.status is SampleStatus.PENDING]
        await generate_samples(ctx, generate_fn, todo, params, stats, recover, max_engine_retries)
        if all(s.status is not SampleStatus.ABORTED for s in group):
            await reward.score_group(ctx, group)
        return group

    barren_waves = 0
    while len(kept) < num_groups:
        if barren_waves >= MAX_BARREN_WAVES:
            raise RuntimeError(
                f"every group of {barren_waves} generation waves in a row was dropped ({counts.filtered_out} by the "
                f"dynamic sampling filter, {counts.reward_skipped} for reward errors under --reward-errors skip); "
                "check --dynamic-sampling-filter-path and the reward"
            )
        kept_before = len(kept)
        groups = data_source.get_groups(over_sampling_groups or (num_groups - len(kept)))
        pending = await collect_wave(ctx, [run_group(g) for g in groups], kept, num_groups, filter_fn, counts)
        barren_waves = 0 if len(kept) > kept_before else barren_waves + 1
        if pending:
            await stop_surplus(ctx, data_source, pending, partial_rollout, counts)

    # Groups finish in whatever order the engines serve them; the batch is ordered by group so that the
    # trainer sees the same batch (and the same split over data-parallel ranks) on every run.
    kept.sort(key=lambda g: g[0].group_index)
    return RolloutResult(kept, rollout_metrics(ctx, kept, stats, counts, time.monotonic() - start))


async def collect_wave(ctx, group_runs, kept, num_groups, filter_fn, counts: GroupCounts) -> set[asyncio.Future]:
    """Keep finished groups that pass the filter until the batch is full; returns the groups still running."""
    pending = {asyncio.ensure_future(run) for run in group_runs}
    started = set(pending)
    try:
        while pending and len(kept) < num_groups:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                group = task.result()
                if reward_checks.reward_failed(group) and ctx.config.rollout.reward_errors == "skip":
                    counts.reward_skipped += 1
                elif len(kept) >= num_groups:
                    counts.discarded += 1
                elif keeps(ctx, filter_fn, group):
                    kept.append(group)
                else:
                    counts.filtered_out += 1
    except BaseException:
        for task in started:  # the rest stop; failures beside the one raised are seen (no "never retrieved")
            task.exception() if task.done() and not task.cancelled() else task.cancel()
        raise
    return pending


def keeps(ctx, filter_fn: FilterFn | None, group: list[Sample]) -> bool:
    if filter_fn is None:
        return True
    with plugin_call(plugin_name("--dynamic-sampling-filter-path", filter_fn), group):
        return filter_fn(ctx, group)


async def stop_surplus(ctx, data_source: DataSource, pending, partial_rollout: bool, counts: GroupCounts) -> None:
    """Enough groups are kept: stop the rest rather than wait for responses that would be thrown away (a
    partial rollout keeps what they generated so far for the next step)."""
    await ctx.abort_all()
    leftovers = sorted(await asyncio.gather(*pending), key=lambda g: g[0].group_index)  # deterministic order
    for group in leftovers:
        if partial_rollout and any(s.status is SampleStatus.ABORTED for s in group):
            data_source.add_back([group], keep_partial=True)
            counts.returned += 1
        else:
            counts.discarded += 1


def rollout_metrics(ctx, kept, stats: RolloutStats, counts: GroupCounts, elapsed: float) -> dict[str, float]:
    samples = [s for g in kept for s in g]
    rewards = [s.scalar_reward(ctx.config.rollout.reward_key) for s in samples]
    lengths = [s.response_length for s in samples]
    return {
        "rollout/reward_mean": sum(rewards) / len(rewards),
        "rollout/response_length_mean": sum(lengths) / len(lengths),
        "rollout/response_length_max": float(max(lengths)),
        "rollout/truncated_fraction": sum(s.status is SampleStatus.TRUNCATED for s in samples) / len(samples),
        "rollout/groups_filtered_out": float(counts.filtered_out),
        "rollout/groups_discarded": float(counts.discarded),
        "rollout/groups_returned_partial": float(counts.returned),
        "rollout/engine_retries": float(stats.engine_retries),
        "rollout/failed_samples": float(sum(s.status is SampleStatus.FAILED for s in samples)),
        "rollout/generated_tokens": float(stats.generated_tokens),
        "rollout/tokens_per_s": stats.generated_tokens / elapsed if elapsed > 0 else 0.0,
    } | reward_error_metrics(ctx, "rollout", samples, counts.reward_skipped)


def reward_error_metrics(ctx, prefix: str, samples: list[Sample], skipped_groups: int) -> dict[str, float]:
    """With --reward-errors zero or skip: how many samples scored 0 and how many groups were dropped for it."""
    if ctx.config.rollout.reward_errors == "fail":
        return {}
    return {
        f"{prefix}/reward_errors_zeroed": float(reward_checks.zeroed(samples)),
        f"{prefix}/reward_errors_skipped_groups": float(skipped_groups),
    }


async def evaluate(
    ctx: RolloutContext,
    name: str,
    samples: list[Sample],
    generate_fn: GenerateFn,
    reward: RewardSpec,
    recover: RecoverFn | None = None,
) -> dict[str, float]:
    """Mean reward over an evaluation set (greedy unless --eval-temperature), samples regenerated from their prompts."""
    params = sampling_params_for(ctx.config, evaluation=True)
    stats = RolloutStats()
    groups: dict[int, list[Sample]] = {}
    for s in samples:
        groups.setdefault(s.group_index, []).append(s)
    with naming_rollout(f"evaluation set {name}"):
        await asyncio.gather(*(generate_samples(ctx, generate_fn, g, params, stats, recover) for g in groups.values()))
        for group in groups.values():
            await reward.score_group(ctx, group)
    skip = ctx.config.rollout.reward_errors == "skip"
    scored = [g for g in groups.values() if not (skip and reward_checks.reward_failed(g))]
    samples = [s for g in scored for s in g]
    skipped = len(groups) - len(scored)
    if not samples:
        first = next(
            s.metadata[reward_checks.REWARD_ERROR]
            for g in groups.values()
            for s in g
            if reward_checks.REWARD_ERROR in s.metadata
        )
        raise PluginFailure(
            "--reward-errors skip", f"dropped every group (first: {first})", "", f"evaluation set {name}"
        )
    rewards = [s.scalar_reward(ctx.config.rollout.reward_key) for s in samples]
    return {
        f"eval/{name}/reward_mean": sum(rewards) / len(rewards),
        f"eval/{name}/response_length_mean": sum(s.response_length for s in samples) / len(samples),
        f"eval/{name}/truncated_fraction": sum(s.status is SampleStatus.TRUNCATED for s in samples) / len(samples),
    } | reward_error_metrics(ctx, f"eval/{name}", samples, skipped)
