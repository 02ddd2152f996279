"""The long-tail generate function of benchmarks/bench_long_tail.py (named by dotted path: long_tail_plugins.generate).

Reasoning RL's response lengths are long-tailed: most answers short, a few very long. This makes the quickstart's
task so: one sample in LONG_EVERY (chosen by its index, so every mode gets the same ones) ignores EOS and writes
LONG_TOKENS tokens; the rest stop as usual within --rollout-max-response-len. The reward still reads the answer
at the front."""

from __future__ import annotations

from slime.rollout.generate import generate as default_generate

LONG_EVERY = 20  # ~5% of samples
LONG_TOKENS = 128


def is_long(index: int | None) -> bool:
    return (index or 0) * 2654435761 % 2**32 % LONG_EVERY == 0  # scattered over groups, the same in every run


async def generate(ctx, sample, sampling_params: dict):
    if is_long(sample.index):
        sampling_params = dict(sampling_params, max_new_tokens=LONG_TOKENS, ignore_eos=True)
    return await default_generate(ctx, sample, sampling_params)
