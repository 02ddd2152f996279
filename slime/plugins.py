"""Plugins: plain functions named by dotted path (`package.module.function`), resolved once from the config.

Contracts (each has a CPU contract test in test/registered/loop/test_plugins.py):
    generate   async def generate(ctx: RolloutContext, sample: Sample, sampling_params: dict) -> Sample
    reward     async def reward(ctx, sample) -> float | dict      (--group-rm: reward(ctx, samples) -> list)
    filter     def keep(ctx, group: list[Sample]) -> bool          (dynamic sampling)
    rollout    async def rollout(ctx, data_source: DataSource, rollout_id: int) -> RolloutResult
    advantage  def advantages(settings, batch: TrainBatch, group_ids: list[int]) -> None (fills the batch)
`ctx.config` is the run's frozen Config. A bad path fails at start-up naming the flag. At run time, a plugin
that raises (or a reward that is not one finite number) ends the run with its traceback and one line naming the
plugin, the sample and the rollout (slime.plugin_failures); --reward-errors zero | skip absorbs reward failures.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from slime.errors import FlagError

if TYPE_CHECKING:
    from slime.config import Config
    from slime.rollout.rollout import FilterFn, GenerateFn, RewardSpec


class PluginError(FlagError):
    """A plugin path (a flag's value) that cannot be imported or called as its contract says."""


def load_function(path: str, flag: str, expected_params: int | None = None) -> Callable:
    """Import `module.attr`; errors name the flag and what is wrong (module missing, attr missing, signature)."""
    module_name, _, attr = path.rpartition(".")
    if not module_name:
        raise PluginError(f"{flag} {path!r}: expected a dotted path like my_pkg.rewards.score")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise PluginError(f"{flag} {path!r}: cannot import module {module_name!r} ({exc})") from None
    fn = getattr(module, attr, None)
    if fn is None:
        raise PluginError(f"{flag} {path!r}: module {module_name!r} has no attribute {attr!r}")
    if not callable(fn):
        raise PluginError(f"{flag} {path!r}: {attr!r} is not callable")
    if expected_params is not None:
        params = [
            p
            for p in inspect.signature(fn).parameters.values()
            if p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
        if len(params) != expected_params:
            raise PluginError(f"{flag} {path!r}: takes {len(params)} required arguments, expected {expected_params}")
    return fn


@dataclass(frozen=True)
class RolloutPlugins:
    generate_fn: GenerateFn
    reward: RewardSpec
    filter_fn: FilterFn | None
    rollout_fn: Callable | None


def load_rollout_plugins(config: Config) -> RolloutPlugins:
    from slime.rollout import generate, rm_hub
    from slime.rollout.rollout import RewardSpec

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


def load_advantage_plugin(config: Config) -> Callable | None:
    path = config.algorithm.custom_advantage_function_path
    return load_function(path, "--custom-advantage-function-path", 3) if path else None
