"""The arithmetic task, a character-level tokenizer, and a tiny Qwen3 — all built locally (no hub)."""

from __future__ import annotations

import json
import random
from pathlib import Path

VOCAB_CHARS = list("0123456789+=")
SPECIAL = ["<pad>", "<eos>"]


def problems(
    seed: int, test_fraction: float = 0.2, carries_in_sft: bool = True, digits: int = 3, val_size: int = 0
) -> dict[str, list[dict]]:
    """Every "x+d=" problem with x of `digits` digits and d in 0..9, split into train and held-out test.

    digits=3 ("abc+d=", 9,000 problems) is the default: with only 900 problems (digits=2, "ab+c=") RL memorizes
    the 720 training prompts (sampled train reward 0.7 while held-out accuracy stays near 0.45), whereas with
    7,200 training prompts nothing is seen often enough to memorize, so what RL improves must generalize.
    `sft` is the slice of train used for the supervised warm-up; with carries_in_sft=False it holds only
    problems without a carry (c + d < 10), so the carry is a skill only the reward can teach. `val` (val_size
    problems taken out of train, in neither sft nor train) decides when the warm-up has gone far enough.
    """
    low, high = 10 ** (digits - 1), 10**digits
    rows = [
        {"prompt": f"{x}+{d}=", "label": x + d, "carry": (x % 10) + d >= 10}
        for x in range(low, high)
        for d in range(10)
    ]
    rng = random.Random(seed)
    rng.shuffle(rows)
    n_test = int(len(rows) * test_fraction)
    test, val, train = rows[:n_test], rows[n_test : n_test + val_size], rows[n_test + val_size :]
    sft = [r for r in train if carries_in_sft or not r["carry"]]
    return {"train": train, "test": test, "sft": sft, "val": val}


def write_jsonl(rows: list[dict], path: Path, with_response: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for r in rows:
            row = {"prompt": r["prompt"], "label": r["label"]}
            if with_response:
                row["response"] = str(r["label"])
            f.write(json.dumps(row) + "\n")
    return path


def build_tokenizer(folder: Path):
    """A character-level tokenizer trained with `tokenizers` and saved as a transformers fast tokenizer."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.trainers import WordLevelTrainer
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    trainer = WordLevelTrainer(special_tokens=SPECIAL, min_frequency=1)
    tok.train_from_iterator(["".join(VOCAB_CHARS)] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")
    fast.save_pretrained(folder)
    return fast


def build_model(
    folder: Path,
    seed: int,
    hidden_size: int = 128,
    num_layers: int = 4,
    vocab_size: int = 16,
    experts: int = 0,
    head_dim: int | None = None,
):
    """A tiny Qwen3 (about 1M parameters at the defaults) saved as safetensors beside the tokenizer; with
    `experts`, a Qwen3-MoE of that many experts (top-2) in every layer. `head_dim` defaults to a quarter of the
    hidden size (sglang-jax's kernels want a multiple of 128)."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    tokenizer = build_tokenizer(folder)
    assert len(tokenizer) <= vocab_size, f"tokenizer has {len(tokenizer)} tokens, more than vocab_size {vocab_size}"
    config_class, model_class = (Qwen3MoeConfig, Qwen3MoeForCausalLM) if experts else (Qwen3Config, Qwen3ForCausalLM)
    moe = dict(num_experts=experts, num_experts_per_tok=2, moe_intermediate_size=hidden_size) if experts else {}
    config = config_class(
        **moe,
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 3,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=head_dim or hidden_size // 4,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        rope_theta=10000.0,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = model_class(config)
    model.save_pretrained(folder, safe_serialization=True)
    return model, tokenizer
