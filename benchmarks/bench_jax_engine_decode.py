"""Decode throughput of the JAX engine beside the embedded (torch) engine, same models, same requests.

    OMP_NUM_THREADS=1 python benchmarks/bench_jax_engine_decode.py [--out bench_jax_engine_decode.json]

For each size (~5M and ~30M parameters, the models of bench_engine_decode.py): batch 32 prompts x 64 new
tokens, sampling at temperature 1 with per-token log-probs, EOS ignored. The figure is generated tokens per
second of wall time (prefill included), best of --repeats runs after one warm-up run of the same shape (the
JAX engine compiles its buckets in the warm-up; that time is reported apart as first_run_s). With
OMP_NUM_THREADS=1 both sides compute on one thread (XLA's host backend is told the same).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

os.environ.setdefault("OMP_NUM_THREADS", "1")
if os.environ["OMP_NUM_THREADS"] == "1":
    os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (REPO, os.path.join(REPO, "benchmarks")):
    if path not in sys.path:
        sys.path.insert(0, path)

from bench_engine_decode import SIZES, build_qwen3, time_engine  # noqa: E402

from slime.rollout.engines.embedded.engine import EmbeddedEngine  # noqa: E402
from slime.rollout.engines.jax.engine import JaxEngine  # noqa: E402


def measure(engine, prompts: torch.Tensor, new_tokens: int, repeats: int) -> tuple[float, float]:
    """(first run seconds, best of `repeats` later runs)."""
    first = time_engine(engine, prompts, new_tokens)
    return first, min(time_engine(engine, prompts, new_tokens) for _ in range(repeats))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--sizes", default=",".join(SIZES))
    parser.add_argument("--out", default="bench_jax_engine_decode.json")
    parser.add_argument(
        "--jax-only", action="store_true", help="no embedded (torch) run: on TPU it would time the host"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    rows = []
    for size in args.sizes.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            hf = build_qwen3(tmp, size)
            params = sum(p.numel() for p in hf.parameters())
            del hf
            vocab = SIZES[size][-1]
            prompts = torch.randint(2, vocab, (args.batch, args.prompt_len), generator=torch.Generator().manual_seed(0))
            context = args.prompt_len + args.new_tokens + 8
            embedded_first = embedded_s = None
            if not args.jax_only:
                with EmbeddedEngine(tmp, max_batch_size=args.batch, max_seq_len=context, seed=0) as embedded:
                    embedded_first, embedded_s = measure(embedded, prompts, args.new_tokens, args.repeats)
            with JaxEngine(tmp, max_batch_size=args.batch, max_seq_len=context, seed=0) as jax_engine:
                jax_first, jax_s = measure(jax_engine, prompts, args.new_tokens, args.repeats)
                traces = jax_engine.traces
                device = str(jax_engine.device.platform)
        generated = args.batch * args.new_tokens
        row = {
            "model": size,
            "parameters": params,
            "batch": args.batch,
            "new_tokens": args.new_tokens,
            "prompt_len": args.prompt_len,
            "threads": int(os.environ["OMP_NUM_THREADS"]),
            "jax_device": device,
            "jax_tok_s": round(generated / jax_s, 1),
            "jax_first_run_s": round(jax_first, 2),
            "jax_compilations": traces,
        }
        if embedded_s is not None:
            row.update(
                embedded_tok_s=round(generated / embedded_s, 1),
                jax_over_embedded=round(embedded_s / jax_s, 2),
                embedded_first_run_s=round(embedded_first, 2),
            )
        rows.append(row)
        beside = (
            f"embedded {row['embedded_tok_s']:8.1f} tok/s   ratio {row['jax_over_embedded']:.2f}x   "
            if embedded_s is not None
            else ""
        )
        print(
            f"{size:10s} {params / 1e6:5.1f}M params  jax ({device}) {row['jax_tok_s']:8.1f} tok/s   {beside}"
            f"(jax first run {row['jax_first_run_s']} s, compilations {traces})",
            flush=True,
        )
    with open(args.out, "w") as f:
        json.dump({"benchmark": "jax_engine_decode", "results": rows}, f, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
