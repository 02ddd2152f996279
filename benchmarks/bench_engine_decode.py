"""Decode throughput of the embedded engine beside HF `generate`, on tiny Qwen3 models built locally.

    OMP_NUM_THREADS=1 python benchmarks/bench_engine_decode.py [--out bench_engine_decode.json]

For each size (~5M and ~30M parameters): batch 32 prompts x 64 new tokens, sampling at temperature 1 with
per-token log-probs on both sides (HF: do_sample, output_scores; EOS ignored via min_new_tokens). The
figure is generated tokens per second of wall time (prefill included), one warm-up then the best of
--repeats runs. Prints a table and writes JSON. --dtype bfloat16 runs both sides in bf16 (the headline
is fp32, the precision the CPU trainer computes log-probs in).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from slime.rollout.engines.base import GenerateRequest, SamplingParams  # noqa: E402
from slime.rollout.engines.embedded.engine import EmbeddedEngine  # noqa: E402

SIZES = {
    # name: (hidden, layers, heads, kv_heads, head_dim, intermediate, vocab)
    "qwen3-5m": (256, 4, 4, 2, 64, 768, 4096),
    "qwen3-30m": (512, 8, 8, 4, 64, 1536, 8192),
}


def build_qwen3(out_dir: str, size: str, dtype: torch.dtype = torch.float32):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    hidden, layers, heads, kv, head_dim, inter, vocab = SIZES[size]
    config = Qwen3Config(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=head_dim,
        intermediate_size=inter,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        eos_token_id=1,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(config).float().eval()
    model.save_pretrained(out_dir, safe_serialization=True)
    return model.to(dtype)


def time_hf(model, prompts: torch.Tensor, new_tokens: int) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            prompts,
            attention_mask=torch.ones_like(prompts),
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            output_scores=True,
            return_dict_in_generate=True,
            pad_token_id=0,
        )
    elapsed = time.perf_counter() - start
    assert out.sequences.shape[1] == prompts.shape[1] + new_tokens
    return elapsed


def time_engine(engine: EmbeddedEngine, prompts: torch.Tensor, new_tokens: int) -> float:
    params = SamplingParams(temperature=1.0, max_new_tokens=new_tokens, ignore_eos=True)
    requests = [GenerateRequest(f"r{i}", row.tolist(), params) for i, row in enumerate(prompts)]
    start = time.perf_counter()
    results = engine.generate(requests)
    elapsed = time.perf_counter() - start
    assert all(len(r.output_ids) == new_tokens and r.output_log_probs is not None for r in results)
    return elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--sizes", default=",".join(SIZES))
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--out", default="bench_engine_decode.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

    dtype = getattr(torch, args.dtype)
    rows = []
    for size in args.sizes.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            hf = build_qwen3(tmp, size, dtype)
            params = sum(p.numel() for p in hf.parameters())
            vocab = SIZES[size][-1]
            prompts = torch.randint(2, vocab, (args.batch, args.prompt_len), generator=torch.Generator().manual_seed(0))
            engine = EmbeddedEngine(
                tmp, max_batch_size=args.batch, max_seq_len=args.prompt_len + args.new_tokens + 8, dtype=dtype, seed=0
            )
            try:
                time_engine(engine, prompts[:4], 4)  # warm-up
                time_hf(hf, prompts[:4], 4)
                engine_s = min(time_engine(engine, prompts, args.new_tokens) for _ in range(args.repeats))
                hf_s = min(time_hf(hf, prompts, args.new_tokens) for _ in range(args.repeats))
            finally:
                engine.shutdown()
        generated = args.batch * args.new_tokens
        row = {
            "model": size,
            "parameters": params,
            "batch": args.batch,
            "new_tokens": args.new_tokens,
            "prompt_len": args.prompt_len,
            "threads": torch.get_num_threads(),
            "dtype": args.dtype,
            "embedded_tok_s": round(generated / engine_s, 1),
            "hf_generate_tok_s": round(generated / hf_s, 1),
            "speedup": round(hf_s / engine_s, 2),
        }
        rows.append(row)
        print(
            f"{size:10s} {params / 1e6:5.1f}M params  embedded {row['embedded_tok_s']:8.1f} tok/s   "
            f"HF generate {row['hf_generate_tok_s']:8.1f} tok/s   speedup {row['speedup']:.2f}x",
            flush=True,
        )
    with open(args.out, "w") as f:
        json.dump({"benchmark": "engine_decode", "results": rows}, f, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
