"""The rollout side's plugins, resolved once from the config (dotted paths) into plain functions.

Contracts (each has a CPU contract test in test/registered/loop/test_plugins.py):
    generate   async def generate(ctx: RolloutContext, sample: Sample, sampling_params: dict) -> Sample
    reward     async def reward(ctx, sample) -> float | dict      (--group-rm: reward(ctx, samples) -> list)
    filter     def keep(ctx, group: list[Sample]) -> bool          (dynamic sampling)
    rollout    async def rollout(ctx, data_source: DataSource, rollout_id: int) -> RolloutResult
`ctx.config` is the run's frozen Config. A bad path fails at start-up naming the flag.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from slime.config import Config
from slime.errors import FlagError
from slime.plugins import load_function
from slime.rollout.rollout import FilterFn, GenerateFn, RewardSpec


@dataclass(frozen=True)
class RolloutPlugins:
    generate_fn: GenerateFn
    reward: RewardSpec
    filter_fn: FilterFn | None
    rollout_fn: Callable | None


def load_rollout_plugins(config: Config) -> RolloutPlugins:
    from slime.rollout import generate, rm_hub

    r = config.rollout
    generate_fn = generate.generate
    if r.custom_generate_function_path:
        generate_fn = load_function(r.custom_generate_function_path, "--custom-generate-function-path", 3)
    custom_rm = load_function(r.custom_rm_path, "--custom-rm-path", 2) if r.custom_rm_path else None
    if r.rm_type is not None and r.rm_type not in (*rm_hub.BUILTIN, "remote_rm"):
        raise FlagError(f"--rm-type {r.rm_type!r} is not one of: {', '.join([*rm_hub.BUILTIN, 'remote_rm'])}")
    remote = None
    if r.rm_type == "remote_rm":
        from slime.rollout.rm_hub.remote import RemoteRewardModel

        remote = RemoteRewardModel(r.rm_url)
    filter_fn = (
        load_function(r.dynamic_sampling_filter_path, "--dynamic-sampling-filter-path", 2)
        if r.dynamic_sampling_filter_path
        else None
    )
    rollout_fn = (
        load_function(r.rollout_function_path, "--rollout-function-path", 3) if r.rollout_function_path else None
    )
    return RolloutPlugins(generate_fn, RewardSpec(r.rm_type, custom_rm, r.group_rm, remote), filter_fn, rollout_fn)
