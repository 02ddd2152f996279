"""The trainers on the device: Megatron (float32, --bf16, a tiny MoE) and JAX, each against transformers' log-probs,
one GRPO step, and the step's exported HF weights giving transformers the trainer's post-step log-probs."""

from __future__ import annotations

import contextlib
import math
import shutil
from pathlib import Path

from slime.backends.cuda.gpu_check.common import (
    CheckContext,
    hf_model,
    hf_response_log_probs,
    max_diff,
    mean_diff,
    run_config,
    samples,
    timed,
)
from slime.backends.cuda.gpu_check.verdicts import jax_gpu_problem
from slime.invariants import LOGPROB_TOLERANCE

FLOAT32_TOLERANCE = 1e-3  # max |diff| per token; float32 agrees to ~1e-6
# Evidence that --bf16 changed the arithmetic: a float32 trainer sits ~1e-6 from transformers' float32 log-probs.
BF16_MOVED_AT_LEAST = 1e-4


def _hf_from_exported(ctx: CheckContext, model: Path, trainer, name: str):
    """transformers loading the trainer's exported HF-named tensors as a checkpoint (its own name conversion
    applies, e.g. transformers 5 fuses per-expert MoE tensors on load), and what it found missing or unexpected."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    folder = ctx.folder / f"exported_{name}"
    folder.mkdir(exist_ok=True)
    exported = {k: t.float().cpu().contiguous() for bucket in trainer.hf_weight_buckets() for k, t in bucket}
    save_file(exported, str(folder / "model.safetensors"))
    shutil.copy(model / "config.json", folder / "config.json")
    hf, info = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch_dtype("float32"), output_loading_info=True)
    return hf.to(ctx.backend.torch_device()).eval(), info


def torch_dtype(name: str):
    import torch

    return getattr(torch, name)


def _step_figures(trainer, ctx: CheckContext, model: Path, name: str, batch, rows, reference_dtype: str) -> dict:
    """Log-probs before and after one step, and transformers' log-probs under the step's exported weights."""
    before, _ = trainer.compute_log_probs(batch)
    metrics, step_s = timed(lambda: trainer.train_step(batch), ctx)
    after, _ = trainer.compute_log_probs(batch)
    hf, info = _hf_from_exported(ctx, model, trainer, name)
    missing, unexpected = info["missing_keys"], info["unexpected_keys"]
    hf_after = hf_response_log_probs(ctx, hf, rows, reference_dtype)
    return {
        "before": before,
        "train_step_seconds": step_s,
        "train_metrics": {k: float(v) for k, v in metrics.items()},
        "step_changed_log_probs_by": max_diff(after, before),
        "exported_vs_trainer_max_abs_diff": max_diff(hf_after, after),
        "exported_vs_trainer_mean_abs_diff": mean_diff(hf_after, after),
        "exported_missing": sorted(k for k in missing if not k.endswith("lm_head.weight")),
        "exported_unexpected": sorted(unexpected),
    }


def _step_ok(figures: dict) -> bool:
    return (
        figures["step_changed_log_probs_by"] > 0
        and not figures["exported_missing"]
        and not figures["exported_unexpected"]
        and all(math.isfinite(v) for v in figures["train_metrics"].values())
    )


@contextlib.contextmanager
def _megatron_world(ctx: CheckContext):
    """A one-rank process group and megatron's parallel state, for one section."""
    from slime.net import free_port
    from slime.training.distributed import destroy_distributed, init_distributed

    init_distributed(ctx.backend, 0, 1, "127.0.0.1", free_port())
    try:
        yield
    finally:
        destroy_distributed()


def check_megatron(ctx: CheckContext, bf16: bool, experts: int = 0) -> dict:
    with _megatron_world(ctx):
        return _megatron(ctx, bf16, experts)


def _megatron(ctx: CheckContext, bf16: bool, experts: int) -> dict:
    """The Megatron trainer built from `slime train` flags (--bf16 reaches it as compute_dtype, as in a run)."""
    from slime.settings import trainer_config
    from slime.training.actor import PolicyTrainer
    from slime.training.batch import TrainBatch

    model = ctx.model(experts)
    config = trainer_config(run_config(model, *(["--bf16"] if bf16 else [])), "actor")
    trainer = PolicyTrainer(config, ctx.backend)
    dtype = config.compute_dtype
    hf = hf_model(ctx, model)
    rows = samples(hf.config.vocab_size)
    reference = hf_response_log_probs(ctx, hf, rows, dtype)
    reference_fp32 = hf_response_log_probs(ctx, hf, rows) if bf16 else reference
    batch = TrainBatch.from_samples(rows, pad_token_id=0)
    figures = _step_figures(trainer, ctx, model, f"megatron_{dtype}_{experts}", batch, rows, dtype)
    before = figures.pop("before")
    result = {
        "compute_dtype": dtype,
        "experts": experts,
        "log_probs_vs_hf_max_abs_diff": max_diff(before, reference),
        "log_probs_vs_hf_mean_abs_diff": mean_diff(before, reference),
        **figures,
        "memory_allocated_bytes": ctx.backend.memory_allocated(),
    }
    if bf16:
        # mean |diff| per token, the bound --ci-test holds a bf16 run's trainer and engine to
        tolerance = LOGPROB_TOLERANCE["bfloat16"]
        result["moved_from_hf_float32_by"] = max_diff(before, reference_fp32)
        close = (
            result["log_probs_vs_hf_mean_abs_diff"] < tolerance
            and result["exported_vs_trainer_mean_abs_diff"] < tolerance
        )
        really_bf16 = dtype == "bfloat16" and result["moved_from_hf_float32_by"] > BF16_MOVED_AT_LEAST
    else:
        tolerance = FLOAT32_TOLERANCE
        close = max(result["log_probs_vs_hf_max_abs_diff"], result["exported_vs_trainer_max_abs_diff"]) < tolerance
        really_bf16 = True
    result["tolerance"] = tolerance
    result["ok"] = close and really_bf16 and _step_ok(result)
    return result


def check_jax_trainer(ctx: CheckContext) -> dict:
    """The JAX trainer on JAX's GPU (a CPU-only JAX beside a GPU fails): float32 log-probs vs transformers, one
    step, exported weights."""
    import jax

    from slime.settings import trainer_config
    from slime.training.batch import TrainBatch
    from slime.training.jax.trainer import JaxPolicyTrainer

    devices = jax.devices()
    problem = jax_gpu_problem([d.platform for d in devices], gpu_present=ctx.on_gpu)
    if problem:
        return {"ok": False, "error": problem, "jax_devices": [str(d) for d in devices]}
    device = next((d for d in devices if d.platform != "cpu"), devices[0])
    model = ctx.model()
    trainer = JaxPolicyTrainer(trainer_config(run_config(model, "--train-backend", "jax"), "actor"), [device])
    hf = hf_model(ctx, model)
    rows = samples(hf.config.vocab_size)
    reference = hf_response_log_probs(ctx, hf, rows)
    batch = TrainBatch.from_samples(rows, pad_token_id=0)
    figures = _step_figures(trainer, ctx, model, "jax", batch, rows, "float32")
    before = figures.pop("before")
    placed = sorted({d.platform for leaf in jax.tree.leaves(trainer.params) for d in leaf.devices()})
    result = {
        "jax": jax.__version__,
        "jax_device": str(device),
        "params_on": placed,
        "log_probs_vs_hf_max_abs_diff": max_diff(before, reference),
        **figures,
        "tolerance": FLOAT32_TOLERANCE,
    }
    close = max(result["log_probs_vs_hf_max_abs_diff"], result["exported_vs_trainer_max_abs_diff"]) < FLOAT32_TOLERANCE
    result["ok"] = close and placed == [device.platform] and _step_ok(result)
    return result
