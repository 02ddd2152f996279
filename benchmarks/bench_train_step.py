"""Time one training step (forward + backward + optimizer) of slime's megatron trainer and of plain
HF transformers + torch AdamW on the same tiny Qwen3, side by side, and write JSON.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_train_step.py --out bench_train_step.json

Both sides train the same weights on the same batch (8 x 128 tokens, loss on the last 64 of each row):
"slime_sft" is PolicyTrainer.sft_step (NLL, comparable to the HF loop), "slime_rl" is train_step with
the GRPO loss (ratio, clipping, entropy) for reference.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

SIZES = {
    # name: (hidden, layers, heads, kv heads, ffn, vocab)
    "5M": (256, 4, 4, 2, 768, 4096),
    "30M": (512, 8, 8, 4, 1536, 8192),
}


def build_checkpoint(size: str, folder: Path) -> int:
    from transformers import AutoModelForCausalLM, Qwen3Config

    hidden, layers, heads, kv, ffn, vocab = SIZES[size]
    config = Qwen3Config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, head_dim=hidden // heads, max_position_embeddings=512,
        tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).float()
    model.save_pretrained(str(folder))
    return sum(p.numel() for p in model.parameters())


def make_samples(vocab: int, rows: int, seq: int, response: int):
    from slime.types import Sample

    g = torch.Generator().manual_seed(1)
    samples = []
    for i in range(rows):
        tokens = torch.randint(0, vocab, (seq,), generator=g).tolist()
        s = Sample(tokens=tokens[: seq - response], index=i, advantage=1.0 if i % 2 else -1.0)
        s.append_response(tokens[seq - response :], [-1.0] * response, trainable=True)
        samples.append(s)
    return samples


def timed_interleaved(steps: dict, warmup: int, repeats: int) -> dict[str, list[float]]:
    """Round-robin over the contenders so that load from other processes hits all of them alike."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return times


def hf_step(folder: Path, samples, lr: float):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.0)
    ids = torch.tensor([s.tokens for s in samples])
    response = samples[0].response_length

    def step():
        logits = model(ids).logits[:, :-1]
        log_probs = torch.log_softmax(logits.float(), dim=-1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        loss = -log_probs[:, -response:].mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def slime_steps(folder: Path, samples, lr: float) -> dict:
    from slime.backends import select_backend
    from slime.net import free_port
    from slime.training.actor import PolicyTrainer
    from slime.training.batch import TrainBatch
    from slime.training.config import TrainerConfig
    from slime.training.distributed import init_distributed

    backend = select_backend("cpu")
    init_distributed(backend, 0, 1, "127.0.0.1", free_port(), tensor_parallel_size=1)
    config = TrainerConfig(
        hf_checkpoint=str(folder),
        lr=lr,
        clip_grad=1.0,
        max_tokens_per_micro_batch=len(samples) * len(samples[0].tokens),
    )
    trainer = PolicyTrainer(config, backend)
    batch = TrainBatch.from_samples(samples, pad_token_id=0)
    return {"slime_sft": lambda: trainer.sft_step(batch), "slime_rl": lambda: trainer.train_step(batch)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--response", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="bench_train_step.json")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

    report = {
        "rows": args.rows,
        "seq": args.seq,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "results": {},
    }
    for size in args.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            params = build_checkpoint(size, folder)
            samples = make_samples(SIZES[size][5], args.rows, args.seq, args.response)
            steps = {"hf": hf_step(folder, samples, 1e-5), **slime_steps(folder, samples, 1e-5)}
            times = timed_interleaved(steps, args.warmup, args.repeats)
            from slime.training.distributed import destroy_distributed

            destroy_distributed()
        entry = {"params": params, **{f"{k}_s": statistics.median(v) for k, v in times.items()}}
        entry["slime_sft_over_hf"] = entry["slime_sft_s"] / entry["hf_s"]
        report["results"][size] = entry
        print(
            f"{size:>4} ({params / 1e6:.1f}M params): HF {entry['hf_s']:.3f} s | slime sft {entry['slime_sft_s']:.3f} s "
            f"({entry['slime_sft_over_hf']:.2f}x HF) | slime GRPO step {entry['slime_rl_s']:.3f} s",
            flush=True,
        )
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
