"""Tiny real HF models and tokenizers built locally (no hub), and a launcher for N gloo ranks."""

from __future__ import annotations

import io
import os
import traceback
from pathlib import Path

import torch
import torch.multiprocessing as mp

VOCAB = 256


def tiny_config(family: str, tie: bool | None = None, **overrides):
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    common = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6,
    )  # fmt: skip
    common.update(overrides)
    if family == "qwen3_moe":  # 4 experts, top-2; hidden 32
        from transformers import Qwen3MoeConfig

        moe = dict(hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_experts=4,
                   num_experts_per_tok=2, norm_topk_prob=True, head_dim=8)  # fmt: skip
        moe = {**common, **moe, **overrides}
        return Qwen3MoeConfig(tie_word_embeddings=False if tie is None else tie, **moe)
    if family == "qwen3":
        return Qwen3Config(tie_word_embeddings=True if tie is None else tie, **{"head_dim": 16, **common})
    if family == "qwen2":
        return Qwen2Config(tie_word_embeddings=False if tie is None else tie, **common)
    if family == "llama":
        rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}  # fmt: skip
        return LlamaConfig(rope_parameters=rope, tie_word_embeddings=False if tie is None else tie, **common)
    raise ValueError(family)


def train_tokenizer(folder: Path) -> None:
    """A byte-level BPE tokenizer trained on a few lines, saved as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = ["the quick brown fox jumps over the lazy dog", "1 + 2 = 3", "what is 7 times 6? 42"] * 20
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=VOCAB - 2, special_tokens=["<pad>", "<eos>"]))
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>").save_pretrained(str(folder))


def make_tiny_model(
    family: str, folder: Path, seed: int = 0, tie: bool | None = None, tokenizer: bool = False, **overrides
):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, tie, **overrides)).float().eval()
    with torch.no_grad():  # norms start at 1.0; randomise them so a mis-mapped norm cannot pass
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
            if name.endswith(".bias"):
                p.normal_(0.0, 0.1)
    model.save_pretrained(str(folder))
    if tokenizer:
        train_tokenizer(folder)
    return model


def _entry(rank, world, port, fn, args, queue):
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        # serialised to bytes: tensors put on a torch queue as-is are shared through file descriptors
        # that die with this process
        payload = io.BytesIO()
        torch.save(fn(rank, world, port, *args), payload)
        queue.put((rank, payload.getvalue(), None))
    except BaseException:  # report the worker's traceback to the test
        queue.put((rank, None, traceback.format_exc()))


def run_ranks(fn, world: int, *args, timeout: float = 240.0) -> list:
    """Run fn(rank, world, port, *args) in `world` spawned processes; return results in rank order."""
    from slime.net import free_port

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, world, port, fn, args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results, errors = {}, []
    try:
        for _ in range(world):
            rank, value, error = queue.get(timeout=timeout)
            if error:
                errors.append(f"rank {rank}:\n{error}")
            results[rank] = None if error else torch.load(io.BytesIO(value), weights_only=False)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    if errors:
        raise AssertionError("\n".join(errors))
    return [results[r] for r in range(world)]


def init_rank(rank: int, world: int, port: int, tp: int, seed: int = 1234, ep: int = 1):
    from slime.backends import select_backend
    from slime.training.distributed import init_distributed

    backend = select_backend("cpu")
    return backend, init_distributed(
        backend, rank, world, "127.0.0.1", port, tensor_parallel_size=tp, expert_parallel_size=ep, seed=seed
    )
