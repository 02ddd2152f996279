#!/usr/bin/env python3
"""Peak memory and time of the log-prob/entropy op: naive log_softmax + gather vs the chunked reference
(and the Triton kernel where a GPU exists).

    OMP_NUM_THREADS=1 python benchmarks/bench_logprob_op.py --json-out /tmp/logprob_op.json

Memory is the peak extra memory of one call beyond its inputs:
  * on a GPU, torch.cuda.max_memory_allocated() after reset, minus the memory held before the call;
  * on CPU, the running sum of the profiler's allocator events (slime.kernels.memory.peak_extra_host_bytes),
    since torch's CPU allocator keeps no high-water mark and tracemalloc does not see tensor storage.
"fwd" runs under no_grad (how reference / old-policy log-probs are computed); "fwd+bwd" includes the backward,
whose result (the N x V logits gradient, in the logits dtype) is counted in peak_extra_mib for every
implementation, and subtracted in peak_beyond_output_grad_mib. Times are the minimum
over --repeats runs, measured without the profiler. The goal from the issue: extra memory <= 1/8 of naive,
time <= naive.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from slime.backends import select_backend
from slime.kernels import get_op, naive_logprobs_and_entropy
from slime.kernels.memory import peak_extra_host_bytes


def make_inputs(rows: int, vocab: int, dtype: torch.dtype, device: str):
    gen = torch.Generator(device="cpu").manual_seed(0)
    logits = (torch.randn(rows, vocab, generator=gen) * 3).to(dtype).to(device)
    tokens = torch.randint(0, vocab, (rows,), generator=gen).to(device)
    return logits, tokens


def run_once(fn, logits, tokens, mode: str, temperature: float):
    if mode == "fwd":
        with torch.no_grad():
            log_probs, entropy = fn(logits, tokens, temperature)
        return
    leaf = logits.detach().requires_grad_()
    log_probs, entropy = fn(leaf, tokens, temperature)
    (log_probs.sum() + 0.01 * entropy.sum()).backward()
    del log_probs, entropy, leaf


def measure(fn, logits, tokens, mode, temperature, repeats, device, backend):
    times = []
    for _ in range(repeats):
        backend.synchronize()
        start = time.perf_counter()
        run_once(fn, logits, tokens, mode, temperature)
        backend.synchronize()
        times.append(time.perf_counter() - start)
    if device == "cpu":
        _, peak = peak_extra_host_bytes(lambda: run_once(fn, logits, tokens, mode, temperature))
    else:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        run_once(fn, logits, tokens, mode, temperature)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    return min(times), peak


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--modes", default="fwd,fwd+bwd")
    parser.add_argument("--chunk-size", type=int, default=None, help="reference chunk size (default: the op's)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--hardware", default="auto")
    parser.add_argument("--with-trainer-formula", action="store_true", help="also time slime.training.log_probs")
    parser.add_argument("--json-out", default="benchmarks/results/logprob_op.json")
    return parser.parse_args()


def implementations(args: argparse.Namespace, device: str) -> dict:
    """name -> fn(logits, tokens, temperature): naive, the chunked reference, and what else this run compares."""
    chunk_kwargs = {} if args.chunk_size is None else {"chunk_size": args.chunk_size}
    reference = get_op("logprobs_and_entropy", impl="torch")
    impls = {
        "naive": lambda x, t, temp: naive_logprobs_and_entropy(x, t, temp),
        "reference": lambda x, t, temp: reference(x, t, temp, **chunk_kwargs),
    }
    if args.with_trainer_formula:
        # the trainer's full-slice formula (slime.training.log_probs) at TP=1, to size the gain of switching
        from slime.training.log_probs import vocab_parallel_log_probs_and_entropy as trainer_formula

        impls["trainer_formula"] = lambda x, t, temp: trainer_formula(x / temp, t, 0, None)
    if device != "cpu":
        triton_op = get_op("logprobs_and_entropy", impl="triton")
        impls["triton"] = lambda x, t, temp: triton_op(x, t, temp)
    return impls


def compare(impls: dict, logits, tokens, mode: str, args: argparse.Namespace, device: str, backend) -> dict:
    """One row of results: each implementation's time and peak memory, and each against the naive one."""
    row = {}
    for name, fn in impls.items():
        seconds, peak = measure(fn, logits, tokens, mode, args.temperature, args.repeats, device, backend)
        # the backward must return an N x V gradient; what an implementation adds beyond it is its cost
        grad_bytes = logits.numel() * logits.element_size() if mode == "fwd+bwd" else 0
        row[name] = {
            "seconds": round(seconds, 4),
            "peak_extra_mib": round(peak / 2**20, 1),
            "peak_beyond_output_grad_mib": round((peak - grad_bytes) / 2**20, 1),
        }
    naive = row["naive"]
    for name, entry in row.items():
        if name != "naive":
            entry["memory_vs_naive"] = round(entry["peak_extra_mib"] / naive["peak_extra_mib"], 4)
            entry["memory_beyond_grad_vs_naive"] = round(
                entry["peak_beyond_output_grad_mib"] / naive["peak_beyond_output_grad_mib"], 4
            )
            entry["time_vs_naive"] = round(entry["seconds"] / naive["seconds"], 3)
    return row


def main() -> int:
    args = parse_args()
    backend = select_backend(args.hardware)
    backend.setup_process(0)
    device = backend.torch_device(0)
    impls = implementations(args, device)
    results = []
    for dtype_name in args.dtypes.split(","):
        logits, tokens = make_inputs(args.rows, args.vocab, getattr(torch, dtype_name), device)
        for mode in args.modes.split(","):
            row = compare(impls, logits, tokens, mode, args, device, backend)
            results.append({"dtype": dtype_name, "mode": mode, **row})
            shown = "  ".join(f"{n}: {r['seconds']:.3f}s {r['peak_extra_mib']:.0f} MiB" for n, r in row.items())
            print(f"{dtype_name:9} {mode:8} {shown}")
        del logits, tokens

    report = {
        "benchmark": "logprobs_and_entropy",
        "rows": args.rows,
        "vocab": args.vocab,
        "temperature": args.temperature,
        "chunk_size": args.chunk_size,
        "device": device,
        "hardware": backend.name,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "platform": platform.platform(),
        "memory_method": "profiler allocator events" if device == "cpu" else "max_memory_allocated",
        "results": results,
    }
    out = Path(args.json_out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
