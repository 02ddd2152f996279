"""Rewards as the rollout takes them: every reward function (--custom-rm-path, a built-in --rm-type, the remote
reward model) called with its failures named (slime.plugin_failures), every value checked to be one finite real
number, and --reward-errors applied to what fails:

    fail  the run ends with one line naming the reward function, the sample and the rollout (the default)
    zero  the sample scores 0 and keeps the line in sample.metadata["reward_error"] (counted per rollout)
    skip  the sample's whole group is dropped and another drawn (counted per rollout)

So no NaN, inf, None, string or tensor of the wrong shape ever becomes a sample's reward.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import numbers
from typing import Any

from slime.errors import FlagError
from slime.plugin_failures import PluginFailure, describe_samples, plugin_call, plugin_name
from slime.rollout import rm_hub
from slime.types import Sample

REWARD_ERROR = "reward_error"  # Sample.metadata: the line of a reward failure that --reward-errors absorbed
HINT = "--reward-errors zero or skip scores such a sample 0 or drops its group instead"


def as_real(value: Any) -> tuple[float | None, str | None]:
    """(the value as a float, None), or (None, what is wrong with it) when it is not one finite real number."""
    if hasattr(value, "shape") and hasattr(value, "item") and not isinstance(value, numbers.Number):
        shape = tuple(value.shape)
        if math.prod(shape) != 1 or len(shape) > 1:
            return None, f"returned a tensor of shape {shape}, not one number"
        value = value.item()
    if not isinstance(value, numbers.Real):
        text = repr(value)
        return None, f"returned {text[:40] + '...' if len(text) > 40 else text} ({type(value).__name__}), not a number"
    number = float(value)
    if not math.isfinite(number):
        return None, f"returned {number}, not a finite number"
    return number, None


def checked_reward(value: Any, key: str | None) -> tuple[Any, str | None]:
    """A reward as the sample keeps it (a float, or a dict whose --reward-key entry is one), or what is wrong."""
    if not isinstance(value, dict):
        return as_real(value)
    if key is None:
        return None, f"returned a dict (keys {sorted(map(str, value))[:6]}); name the one to train on with --reward-key"
    if key not in value:
        return None, f"returned a dict without the --reward-key {key!r}"
    number, problem = as_real(value[key])
    return (dict(value, **{key: number}), None) if problem is None else (None, f"[{key!r}] {problem}")


def _source(spec, rm_type: str | None) -> tuple[str, Any, bool]:
    """(plugin name, function, whether it is the user's code) of the reward function in use."""
    if spec.custom_rm is not None:
        return plugin_name("--custom-rm-path", spec.custom_rm), spec.custom_rm, True
    if rm_type == "remote_rm":
        return f"--rm-type remote_rm at {spec.remote.url}", None, False
    if rm_type not in rm_hub.BUILTIN:
        raise FlagError(f"unknown --rm-type {rm_type!r}; built in: {', '.join([*rm_hub.BUILTIN, 'remote_rm'])}")
    return f"--rm-type {rm_type}", rm_hub.BUILTIN[rm_type], False


async def _one(spec, ctx, sample: Sample, key: str | None) -> Any:
    """The checked reward of one sample, or the PluginFailure saying why there is none."""
    plugin, fn, user_code = _source(spec, spec.rm_type)
    try:
        with plugin_call(plugin, [sample], user_code=user_code):
            if spec.custom_rm is not None:
                value = spec.custom_rm(ctx, sample)
            elif fn is None:
                value = spec.remote.score(sample)
            else:
                value = fn(sample.response, sample.label)
            value = await value if inspect.isawaitable(value) else value
    except PluginFailure as failure:
        return failure
    reward, problem = checked_reward(value, key)
    return reward if problem is None else PluginFailure(plugin, problem, describe_samples([sample]))


async def _group(spec, ctx, group: list[Sample], key: str | None) -> list[Any]:
    """--group-rm: one call for the whole group; a failure of the call is every sample's."""
    plugin = plugin_name("--custom-rm-path", spec.custom_rm)
    try:
        with plugin_call(plugin, group):
            values = spec.custom_rm(ctx, group)
            values = await values if inspect.isawaitable(values) else values
    except PluginFailure as failure:
        return [failure] * len(group)
    if not isinstance(values, (list, tuple)) or len(values) != len(group):
        count = len(values) if isinstance(values, (list, tuple)) else type(values).__name__
        problem = f"returned {count} rewards for {len(group)} samples (--group-rm: a list, one per sample)"
        return [PluginFailure(plugin, problem, describe_samples(group))] * len(group)
    outcomes = []
    for sample, value in zip(group, values):
        reward, problem = checked_reward(value, key)
        outcomes.append(reward if problem is None else PluginFailure(plugin, problem, describe_samples([sample])))
    return outcomes


async def score_group(spec, ctx, group: list[Sample]) -> None:
    """Set each sample's reward under --reward-errors (see the module's docstring); `spec` is a RewardSpec."""
    r = ctx.config.rollout
    for sample in group:
        sample.metadata.pop(REWARD_ERROR, None)
    if spec.custom_rm is not None and spec.group_rm:
        outcomes = await _group(spec, ctx, group, r.reward_key)
    else:
        outcomes = await asyncio.gather(*(_one(spec, ctx, s, r.reward_key) for s in group))
    failures = [o for o in outcomes if isinstance(o, PluginFailure)]
    if failures and r.reward_errors == "fail":
        first = failures[0]
        raise PluginFailure(first.plugin, first.problem, first.where, hint=HINT, user_traceback=first.user_traceback)
    for sample, outcome in zip(group, outcomes):
        failed = isinstance(outcome, PluginFailure)
        sample.reward = (0.0 if r.reward_errors == "zero" else None) if failed else outcome
        if failed:
            sample.metadata[REWARD_ERROR] = outcome.line()


def reward_failed(group: list[Sample]) -> bool:
    return any(REWARD_ERROR in s.metadata for s in group)


def zeroed(samples: list[Sample]) -> int:
    return sum(REWARD_ERROR in s.metadata for s in samples)
