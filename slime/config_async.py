"""The start-up refusals of --fully-async (slime.config validates with them)."""

from __future__ import annotations


def check_fully_async(config) -> list[str]:
    """Flags --fully-async cannot run with, each named (the parser's Config; typed loosely: this module sits under it)."""
    t, r = config.train, config.rollout
    if not t.fully_async:
        return []
    refused = {
        "--colocate (trainer and engines take turns on shared devices)": config.cluster.colocate,
        "--async (one rollout ahead; --fully-async generates all the time)": t.async_rollout,
        "--rollout-function-path (a custom rollout makes whole batches)": r.rollout_function_path,
        "--over-sampling-batch-size (the stream keeps its own surplus)": r.over_sampling_batch_size is not None,
        "--partial-rollout": r.partial_rollout,
    }
    return [f"--fully-async cannot run with {what}" for what, given in refused.items() if given]
