"""One-shot GPU check: a short run on a single NVIDIA GPU that writes one JSON report.

    python -m slime.backends.cuda.gpu_check --out gpu_check.json     (scripts/gpu_check.sh wraps this)

Sections, each timed and independent (one failing does not stop the others):
  triton_logprob   the Triton log-prob/entropy kernel against its torch reference: values, gradients, peak memory, time
  megatron_fp32    the Megatron trainer on one GPU: log-probs against transformers', one train step, and the exported
  megatron_bf16    HF weights giving transformers the trainer's post-step log-probs (fp32, then bf16)
  embedded_engine  the embedded rollout engine on the GPU: greedy tokens and their log-probs against transformers
  jax_trainer      the JAX trainer on the GPU: log-probs vs transformers (fp32), one step, exported weights
  env              `slime env --json`
Built for a machine without network: models and tokenizers are built locally (as the CPU quickstart does).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from slime.backends.base import Backend
from slime.backends.cuda import CudaBackend

ROWS, VOCAB = 256, 32768  # kernel check: a [rows, vocab] logits block
# Built without probing (main() checked for a GPU first). --dry-run-on-cpu swaps in the CPU backend so CI runs the
# trainer and engine sections' code on the host; there is no Triton section then.
_BACKEND: Backend = CudaBackend()


def no_gpu_reason() -> str | None:
    """Why this machine cannot run the check (None when a GPU is visible); reads device nodes only."""
    count, reason = CudaBackend().detect_devices()
    return None if count else reason


def _timed_median(fn: Callable[[], object], repeats: int = 5) -> float:
    import torch

    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _peak_bytes(fn: Callable[[], object]) -> int:
    import torch

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return int(torch.cuda.max_memory_allocated() - base)


def check_triton_logprob() -> dict:
    import torch

    from slime.kernels.registry import get_op

    g = torch.Generator(device="cuda").manual_seed(0)
    logits = (4 * torch.randn(ROWS, VOCAB, device="cuda", generator=g)).requires_grad_(True)
    tokens = torch.randint(0, VOCAB, (ROWS,), device="cuda", generator=g)
    ops = {impl: get_op("logprobs_and_entropy", impl=impl) for impl in ("torch", "triton")}
    out: dict = {"rows": ROWS, "vocab": VOCAB}
    results = {}
    for impl, op in ops.items():

        def forward_backward(op=op):
            logits.grad = None
            lp, ent = op(logits, tokens, temperature=0.7)
            (lp.sum() + 0.1 * ent.sum()).backward()
            return lp, ent

        lp, ent = forward_backward()
        results[impl] = (lp.detach(), ent.detach(), logits.grad.detach().clone())
        out[f"{impl}_seconds"] = _timed_median(forward_backward)
        out[f"{impl}_peak_bytes"] = _peak_bytes(forward_backward)
    (lp_t, ent_t, g_t), (lp_k, ent_k, g_k) = results["torch"], results["triton"]
    out["max_abs_diff"] = {
        "log_probs": float((lp_t - lp_k).abs().max()),
        "entropy": float((ent_t - ent_k).abs().max()),
        "grad": float((g_t - g_k).abs().max()),
    }
    out["ok"] = max(out["max_abs_diff"].values()) < 1e-3 and out["triton_peak_bytes"] <= out["torch_peak_bytes"]
    return out


def build_tiny_model(folder: Path):
    """The quickstart's tiny Qwen3 (character tokenizer), larger vocabulary so the kernels see a real width."""
    from slime.quickstart.task import build_model

    model, _ = build_model(folder, seed=0, hidden_size=128, num_layers=2, vocab_size=64)
    return model


def _samples(vocab: int, rows: int = 4, prompt: int = 12, response: int = 20):
    import torch

    from slime.types import Sample

    g = torch.Generator().manual_seed(1)
    samples = []
    for i in range(rows):
        tokens = torch.randint(2, vocab, (prompt + response,), generator=g).tolist()
        sample = Sample(tokens=tokens[:prompt], index=i, advantage=1.0 if i % 2 else -1.0)
        sample.append_response(tokens[prompt:], [-1.0] * response, trainable=True)
        samples.append(sample)
    return samples


def hf_response_log_probs(model, samples, dtype) -> list:
    """transformers' log-probs of each sample's response tokens (the reference)."""
    import torch

    out = []
    with torch.no_grad():
        for s in samples:
            ids = torch.tensor([s.tokens], device=_BACKEND.torch_device())
            with torch.autocast(_BACKEND.torch_device_type, dtype=dtype, enabled=dtype != torch.float32):
                logits = model(ids).logits[0, :-1].float()
            lp = torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None]).squeeze(-1)
            out.append(lp[-s.response_length :].cpu())
    return out


def _max_diff(a: list, b: list) -> float:
    return max(float((x.float() - y.float()).abs().max()) for x, y in zip(a, b))


def check_megatron(folder: Path, dtype_name: str) -> dict:
    """Log-probs against transformers, one GRPO step, and the step's exported HF weights back in transformers."""
    import torch
    from transformers import AutoModelForCausalLM

    from slime.training.actor import PolicyTrainer
    from slime.training.batch import TrainBatch
    from slime.training.config import TrainerConfig

    dtype = getattr(torch, dtype_name)
    overrides = (("bf16", True),) if dtype == torch.bfloat16 else ()
    config = TrainerConfig(hf_checkpoint=str(folder), lr=1e-3, megatron_overrides=overrides)
    trainer = PolicyTrainer(config, _BACKEND)
    hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).to(_BACKEND.torch_device()).eval()
    samples = _samples(hf.config.vocab_size)
    batch = TrainBatch.from_samples(samples, pad_token_id=0)
    before, _ = trainer.compute_log_probs(batch)
    reference = hf_response_log_probs(hf, samples, dtype)
    start = time.perf_counter()
    metrics = trainer.train_step(batch)
    _BACKEND.synchronize()
    step_s = time.perf_counter() - start
    after, _ = trainer.compute_log_probs(batch)
    exported = {name: t.float() for bucket in trainer.hf_weight_buckets() for name, t in bucket}
    missing, unexpected = hf.load_state_dict(exported, strict=False)
    hf_after = hf_response_log_probs(hf, samples, dtype)
    tolerance = 1e-3 if dtype == torch.float32 else 0.15
    result = {
        "log_probs_vs_hf_max_abs_diff": _max_diff(before, reference),
        "train_step_seconds": step_s,
        "train_metrics": {k: float(v) for k, v in metrics.items()},
        "step_changed_log_probs_by": _max_diff(after, before),
        "exported_weights_vs_trainer_max_abs_diff": _max_diff(hf_after, after),
        "exported_missing": [k for k in missing if not k.endswith("lm_head.weight")],
        "exported_unexpected": list(unexpected),
        "memory_allocated_bytes": _BACKEND.memory_allocated(),
        "tolerance": tolerance,
    }
    result["ok"] = (
        result["log_probs_vs_hf_max_abs_diff"] < tolerance
        and result["exported_weights_vs_trainer_max_abs_diff"] < tolerance
        and result["step_changed_log_probs_by"] > 0
        and not result["exported_missing"]
        and all(math.isfinite(v) for v in result["train_metrics"].values())
    )
    return result


def check_embedded_engine(folder: Path) -> dict:
    """Greedy tokens from the embedded engine on the GPU, their log-probs against transformers'."""
    import torch
    from transformers import AutoModelForCausalLM

    from slime.rollout.engines.base import GenerateRequest, SamplingParams
    from slime.rollout.engines.embedded.engine import EmbeddedEngine
    from slime.types import Sample

    engine = EmbeddedEngine(
        str(folder), _BACKEND.torch_device(), max_batch_size=4, max_seq_len=64, dtype=torch.float32, seed=0
    )
    try:
        prompts = [[5, 6, 7, 8], [9, 10, 11], [3, 4]]
        greedy = SamplingParams(temperature=0.0, max_new_tokens=12)
        start = time.perf_counter()
        results = engine.generate([GenerateRequest(f"r{i}", p, greedy) for i, p in enumerate(prompts)])
        seconds = time.perf_counter() - start
    finally:
        engine.shutdown()
    samples = []
    for prompt, r in zip(prompts, results):
        sample = Sample(tokens=list(prompt), index=0)
        sample.append_response(r.output_ids, r.output_log_probs, trainable=True)
        samples.append(sample)
    hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).to(_BACKEND.torch_device()).eval()
    reference = hf_response_log_probs(hf, samples, torch.float32)
    engine_lp = [torch.tensor(r.output_log_probs or [0.0] * len(r.output_ids)) for r in results]
    diff = _max_diff(engine_lp, reference)
    return {
        "generate_seconds": seconds,
        "finish_reasons": [r.finish_reason for r in results],
        "log_probs_vs_hf_max_abs_diff": diff,
        "ok": diff < 1e-3 and all(r.output_ids for r in results),
    }


def check_jax_trainer(folder: Path) -> dict:
    """The JAX trainer on the GPU JAX sees (its own device, not torch's): log-probs against transformers in fp32,
    one GRPO step, the step's exported weights against the trainer's log-probs."""
    import importlib.util

    if importlib.util.find_spec("jax") is None or importlib.util.find_spec("optax") is None:
        return {"ok": None, "status": "jax/optax not installed"}
    import jax
    import torch
    from transformers import AutoModelForCausalLM

    from slime.training.batch import TrainBatch
    from slime.training.config import TrainerConfig
    from slime.training.jax.trainer import JaxPolicyTrainer

    devices = jax.devices()
    trainer = JaxPolicyTrainer(TrainerConfig(hf_checkpoint=str(folder), lr=1e-3), devices[:1])
    hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).to(_BACKEND.torch_device()).eval()
    samples = _samples(hf.config.vocab_size)
    batch = TrainBatch.from_samples(samples, pad_token_id=0)
    before, _ = trainer.compute_log_probs(batch)
    reference = hf_response_log_probs(hf, samples, torch.float32)
    start = time.perf_counter()
    metrics = trainer.train_step(batch)
    step_s = time.perf_counter() - start
    after, _ = trainer.compute_log_probs(batch)
    exported = {name: t.float() for bucket in trainer.hf_weight_buckets() for name, t in bucket}
    hf.load_state_dict(exported, strict=False)
    result = {
        "jax_device": str(devices[0]),
        "log_probs_vs_hf_max_abs_diff": _max_diff([t.cpu() for t in before], reference),
        "train_step_seconds": step_s,
        "train_metrics": {k: float(v) for k, v in metrics.items()},
        "step_changed_log_probs_by": _max_diff(after, before),
        "exported_weights_vs_trainer_max_abs_diff": _max_diff(hf_response_log_probs(hf, samples, torch.float32), after),
        "tolerance": 1e-3,
    }
    result["ok"] = (
        result["log_probs_vs_hf_max_abs_diff"] < 1e-3
        and result["exported_weights_vs_trainer_max_abs_diff"] < 1e-3
        and result["step_changed_log_probs_by"] > 0
        and all(math.isfinite(v) for v in result["train_metrics"].values())
    )
    return result


def check_env() -> dict:
    from slime.env_report import collect_report

    return {"ok": True, "report": collect_report("auto")}


def run_section(name: str, fn: Callable[[], dict], report: dict) -> None:
    start = time.perf_counter()
    try:
        result = fn()
    except Exception as exc:  # one broken section must not hide the others' findings
        result = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-4000:]}
    result["seconds"] = round(time.perf_counter() - start, 3)
    report["sections"][name] = result
    print(
        f"gpu_check: {name}: {'ok' if result.get('ok') else result.get('status') or 'FAILED'} ({result['seconds']} s)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    parser.add_argument("--dry-run-on-cpu", action="store_true", help="CI: the trainer and engine sections on the host")
    args = parser.parse_args(argv)
    # torch and JAX share the GPU in this one process: JAX must not grab most of its memory up front.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    global _BACKEND
    if args.dry_run_on_cpu:
        from slime.backends.cpu import CpuBackend

        _BACKEND = CpuBackend()
    elif (reason := no_gpu_reason()) is not None:
        print(f"gpu_check: no GPU on this machine ({reason}); nothing to check")
        return 2
    import torch

    from slime.net import free_port
    from slime.training.distributed import destroy_distributed, init_distributed

    report: dict = {"python": sys.version.split()[0], "torch": torch.__version__, "sections": {}}
    started = time.perf_counter()
    if not args.dry_run_on_cpu:
        report["device"] = torch.cuda.get_device_name(0)
        run_section("triton_logprob", check_triton_logprob, report)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        build_tiny_model(folder)
        init_distributed(_BACKEND, 0, 1, "127.0.0.1", free_port())
        try:
            for dtype in ("float32", "bfloat16"):
                run_section(f"megatron_{dtype}", lambda dtype=dtype: check_megatron(folder, dtype), report)
        finally:
            destroy_distributed()
        run_section("embedded_engine", lambda: check_embedded_engine(folder), report)
        run_section("jax_trainer", lambda: check_jax_trainer(folder), report)
    run_section("env", check_env, report)
    report["seconds"] = round(time.perf_counter() - started, 3)
    report["ok"] = all(s.get("ok") is not False for s in report["sections"].values())
    args.out.write_text(json.dumps(report, indent=1, default=str) + "\n")
    print(f"gpu_check: wrote {args.out} ({'all ok' if report['ok'] else 'FAILURES, see the report'})")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
