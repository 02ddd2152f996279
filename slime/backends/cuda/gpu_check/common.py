"""What the sections share: where they run (CheckContext), the tiny models they build, the reference log-probs
from transformers, and the run config built from `slime train` flags (so precision goes through --bf16 and
--rollout-dtype exactly as in a run)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from slime.backends.base import Backend


@dataclass
class CheckContext:
    backend: Backend  # CudaBackend, or CpuBackend for --dry-run-on-cpu
    folder: Path  # scratch folder: tiny models, data, run outputs
    on_gpu: bool
    deadline: float  # time.monotonic() by which the whole check must end

    def model(self, experts: int = 0) -> Path:
        """The quickstart's tiny Qwen3 (-MoE with experts), built once per kind in the scratch folder."""
        from slime.quickstart.task import build_model

        path = self.folder / (f"model_moe{experts}" if experts else "model")
        if not (path / "config.json").exists():
            build_model(path, seed=0, hidden_size=128, num_layers=2, vocab_size=64, experts=experts)
        return path

    def seconds_left(self) -> float:
        return self.deadline - time.monotonic()


def run_config(model: Path, *flags: str):
    """The run config `slime train --hf-checkpoint MODEL ... FLAGS` would build (validated as a run's is)."""
    from slime.config import parse_config

    base = ["--hf-checkpoint", str(model), "--prompt-data", str(model / "unused.jsonl"), "--rm-type", "math"]
    return parse_config([*base, "--lr", "1e-3", *flags])


def samples(vocab: int, rows: int = 4, prompt: int = 12, response: int = 20):
    import torch

    from slime.types import Sample

    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(rows):
        tokens = torch.randint(2, vocab, (prompt + response,), generator=g).tolist()
        sample = Sample(tokens=tokens[:prompt], index=i, advantage=1.0 if i % 2 else -1.0)
        sample.append_response(tokens[prompt:], [-1.0] * response, trainable=True)
        out.append(sample)
    return out


def hf_model(ctx: CheckContext, model: Path, dtype_name: str = "float32"):
    import torch
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, dtype_name)
    return AutoModelForCausalLM.from_pretrained(str(model), dtype=dtype).to(ctx.backend.torch_device()).eval()


def hf_response_log_probs(ctx: CheckContext, hf, batch_samples, autocast_dtype: str = "float32") -> list:
    """transformers' log-probs of each sample's response tokens (the reference); `autocast_dtype` bfloat16 computes
    as the --bf16 trainer does: float32 weights, matmuls under autocast."""
    import torch

    dtype = getattr(torch, autocast_dtype)
    device = ctx.backend.torch_device()
    out = []
    with torch.no_grad():
        for s in batch_samples:
            ids = torch.tensor([s.tokens], device=device)
            with torch.autocast(ctx.backend.torch_device_type, dtype=dtype, enabled=dtype != torch.float32):
                logits = hf(ids).logits[0, :-1].float()
            lp = torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None]).squeeze(-1)
            out.append(lp[-s.response_length :].cpu())
    return out


def max_diff(a: list, b: list) -> float:
    return max(float((x.float().cpu() - y.float().cpu()).abs().max()) for x, y in zip(a, b))


def mean_diff(a: list, b: list) -> float:
    import torch

    return float(torch.cat([(x.float().cpu() - y.float().cpu()).abs().reshape(-1) for x, y in zip(a, b)]).mean())


def timed(fn: Callable[[], object], ctx: CheckContext) -> tuple[object, float]:
    start = time.perf_counter()
    out = fn()
    ctx.backend.synchronize()
    return out, time.perf_counter() - start
