"""The embedded rollout engine on the device, started as a run's engine worker starts it (EngineSpec from the run
config, so --rollout-dtype bfloat16 reaches it as in a run): greedy tokens and their log-probs against
transformers'."""

from __future__ import annotations

from slime.backends.cuda.gpu_check.common import CheckContext, hf_model, hf_response_log_probs, max_diff, mean_diff
from slime.invariants import LOGPROB_TOLERANCE

PROMPTS = ([5, 6, 7, 8], [9, 10, 11], [3, 4])
NEW_TOKENS = 12


def _generate(ctx: CheckContext, dtype: str) -> tuple[list, str, float]:
    """(results, the engine's weight dtype, seconds) from an engine built by slime.ray.engine_worker.start_engine."""
    import time

    from slime.backends.cuda.gpu_check.common import run_config
    from slime.ray.engine_worker import start_engine
    from slime.rollout.engines.base import GenerateRequest, SamplingParams
    from slime.settings import engine_spec

    flags = ("--rollout-engine", "embedded", "--rollout-dtype", dtype, "--rollout-engine-batch-size", "4")
    spec = engine_spec(run_config(ctx.model(), *flags), ctx.backend)
    engine, _url, stop = start_engine(spec, ctx.backend)
    try:
        greedy = SamplingParams(temperature=0.0, max_new_tokens=NEW_TOKENS)
        start = time.perf_counter()
        results = engine.generate([GenerateRequest(f"r{i}", p, greedy) for i, p in enumerate(PROMPTS)])
        seconds = time.perf_counter() - start
        weights_dtype = str(engine.model.embed.dtype).removeprefix("torch.")
    finally:
        stop()
        engine.shutdown()
    return results, weights_dtype, seconds


def check_embedded_engine(ctx: CheckContext, dtype: str) -> dict:
    """float32: log-probs within 1e-3 of transformers' (max). bfloat16: the engine's weights are bfloat16, its
    log-probs within --ci-test's bf16 bound of transformers in bfloat16 (mean), and off float32's (it really ran
    in bfloat16)."""
    import torch

    from slime.types import Sample

    results, weights_dtype, seconds = _generate(ctx, dtype)
    rows = []
    for prompt, r in zip(PROMPTS, results):
        sample = Sample(tokens=list(prompt), index=0)
        sample.append_response(r.output_ids, r.output_log_probs, trainable=True)
        rows.append(sample)
    engine_lp = [torch.tensor(r.output_log_probs or [0.0] * len(r.output_ids)) for r in results]
    reference = hf_response_log_probs(ctx, hf_model(ctx, ctx.model(), dtype), rows)
    result = {
        "engine_weights_dtype": weights_dtype,
        "generate_seconds": seconds,
        "finish_reasons": [r.finish_reason for r in results],
        "log_probs_vs_hf_max_abs_diff": max_diff(engine_lp, reference),
        "log_probs_vs_hf_mean_abs_diff": mean_diff(engine_lp, reference),
    }
    generated = all(r.output_ids for r in results)
    if dtype == "float32":
        result["tolerance"] = 1e-3
        result["ok"] = generated and result["log_probs_vs_hf_max_abs_diff"] < 1e-3 and weights_dtype == dtype
        return result
    result["tolerance"] = LOGPROB_TOLERANCE[dtype]
    result["moved_from_hf_float32_by"] = max_diff(
        engine_lp, hf_response_log_probs(ctx, hf_model(ctx, ctx.model()), rows)
    )
    result["ok"] = (
        generated
        and weights_dtype == dtype
        and result["log_probs_vs_hf_mean_abs_diff"] < result["tolerance"]
        and result["moved_from_hf_float32_by"] > 1e-4
    )
    return result
