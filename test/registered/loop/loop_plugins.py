"""Plugins the end-to-end tests name by dotted path (`loop_plugins.<name>`): each follows the contract in
slime/plugins.py and runs inside the rollout manager's Ray actor."""

from __future__ import annotations

import os
import signal

import torch

from slime.rollout.generate import generate as default_generate
from slime.types import Sample

KILL_AT_SAMPLE = 6
_killed = False


async def generate_killing_the_engine_once(ctx, sample: Sample, sampling_params: dict) -> Sample:
    """The default generate, except that the first time sample KILL_AT_SAMPLE starts, the engine process is
    SIGKILLed first: requests of the other samples are in flight at that moment."""
    global _killed
    if not _killed and sample.index == KILL_AT_SAMPLE:
        _killed = True
        session = await ctx.session()
        async with session.get(ctx.urls[0] + "/get_server_info") as response:
            pid = (await response.json())["pid"]
        os.kill(pid, signal.SIGKILL)
    return await default_generate(ctx, sample, sampling_params)


async def generate_killing_the_last_engine_in_rollout_1(ctx, sample: Sample, sampling_params: dict) -> Sample:
    """As above, for the last engine and in the second rollout (4 x 4 samples per rollout), so the engine that
    replaces it must be given weights newer than the checkpoint it starts from."""
    global _killed
    if not _killed and sample.index == 16 + KILL_AT_SAMPLE:
        _killed = True
        session = await ctx.session()
        async with session.get(ctx.urls[-1] + "/get_server_info") as response:
            pid = (await response.json())["pid"]
        os.kill(pid, signal.SIGKILL)
    return await default_generate(ctx, sample, sampling_params)


async def generate_losing_the_last_engine_host_once(ctx, sample: Sample, sampling_params: dict) -> Sample:
    """The default generate, except that the first time sample KILL_AT_SAMPLE starts, every process of the last
    engine's host is SIGKILLed (slime.testing.hosts: the host goes down) while the other samples are in flight."""
    global _killed
    if not _killed and sample.index == KILL_AT_SAMPLE:
        _killed = True
        from slime.testing.hosts import kill_host_of

        session = await ctx.session()
        async with session.get(ctx.urls[-1] + "/get_server_info") as response:
            pid = (await response.json())["pid"]
        kill_host_of(pid)
    return await default_generate(ctx, sample, sampling_params)


INJECTED = "+0="  # the "tool output" appended between the two turns: never trained on


async def two_turn_generate(ctx, sample: Sample, sampling_params: dict) -> Sample:
    """Multi-turn: generate up to 2 tokens, append tool tokens with loss mask 0, then generate the rest."""
    first = dict(sampling_params, max_new_tokens=2)
    await default_generate(ctx, sample, first)
    tool_ids = ctx.tokenizer(INJECTED, add_special_tokens=False)["input_ids"]
    sample.append_response(tool_ids, None, trainable=False)
    budget = dict(sampling_params, max_new_tokens=sampling_params["max_new_tokens"] + len(tool_ids) + 2)
    await default_generate(ctx, sample, budget)
    sample.metadata["tool_ids"] = tool_ids
    return sample


def parity_reward(ctx, sample: Sample) -> float:
    """1 when the response has an even number of characters: varies within groups of a random model."""
    return float(len(sample.response) % 2 == 0)


def group_rank_reward(ctx, samples: list[Sample]) -> list[float]:
    """Group reward: 1 for the longest response(s) of the group, 0 for the others."""
    longest = max(len(s.response) for s in samples)
    return [float(len(s.response) == longest) for s in samples]


def constant_advantage(settings, batch, group_ids) -> None:
    """--custom-advantage-function-path: 0.5 on every response token."""
    batch.advantages = [torch.full((n,), 0.5) for n in batch.response_lengths]
    batch.returns = [a.clone() for a in batch.advantages]


def one_value_per_sample_advantage(settings, batch, group_ids) -> None:
    """A broken estimator: one advantage per sample instead of one per token."""
    batch.advantages = [torch.tensor([0.5]) for _ in batch.response_lengths]
    batch.returns = list(batch.advantages)


def failing_reward(ctx, sample: Sample) -> float:
    """A reward service that fails on sample 5 (the others score by parity)."""
    if sample.index == 5:
        raise ValueError("reward service returned 503")
    return parity_reward(ctx, sample)


def nan_or_failing_reward(ctx, sample: Sample) -> float:
    """NaN for every sample whose index is a multiple of 5, an exception for index % 7 == 3, else parity."""
    if sample.index % 7 == 3:
        raise ConnectionError("reward service timed out")
    return float("nan") if sample.index % 5 == 0 else parity_reward(ctx, sample)


def failing_odd_groups_reward(ctx, sample: Sample) -> float:
    """Parity, except that every sample of an odd group fails (a flaky service): --reward-errors skip drops them."""
    if sample.group_index % 2 == 1:
        raise TimeoutError("reward service timed out")
    return parity_reward(ctx, sample)
