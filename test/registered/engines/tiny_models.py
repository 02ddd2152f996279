"""Tiny real HF checkpoints (Qwen2, Qwen3, Llama, Qwen3-MoE) and a locally trained tokenizer, for engine tests."""

from __future__ import annotations

import os

import torch

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "reinforcement learning from verifiable rewards",
    "one two three four five six seven eight nine ten",
    "answer: 42. the end.",
    "slime trains policies with rollouts and rewards",
] * 20


def train_tokenizer(out_dir: str, vocab_size: int = 256):
    """A byte-level BPE trained on a tiny corpus, saved as a transformers fast tokenizer. EOS = id 1."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")
    fast.save_pretrained(out_dir)
    return fast


def build_model(
    family: str,
    out_dir: str,
    seed: int = 0,
    vocab_size: int = 320,
    tie: bool = False,
    with_tokenizer: bool = False,
    **overrides,
):
    """Build a randomly initialized tiny HF causal LM of `family`, save it to out_dir, return it (fp32, eval)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=tie,
        eos_token_id=1,
        pad_token_id=0,
        bos_token_id=None,
    )
    common.update(overrides)
    if family == "qwen3_moe":  # 4 experts, top-2, hidden 32
        from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

        moe = dict(hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_experts=4,
                   num_experts_per_tok=2, norm_topk_prob=True, head_dim=8)  # fmt: skip
        config, cls = Qwen3MoeConfig(**{**common, **moe, **overrides}), Qwen3MoeForCausalLM
    elif family == "qwen3":
        config, cls = Qwen3Config(**{"head_dim": 16, **common}), Qwen3ForCausalLM
    elif family == "qwen2":
        config, cls = Qwen2Config(**common), Qwen2ForCausalLM
    elif family == "llama":
        config, cls = LlamaConfig(**common), LlamaForCausalLM
    else:
        raise ValueError(family)
    torch.manual_seed(seed)
    model = cls(config).float().eval()
    # Random init leaves biases and norms at 0 / 1; perturb them so a mapping mistake shows in the logits.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.add_(torch.randn_like(param) * 0.1)
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    if with_tokenizer:
        train_tokenizer(out_dir, vocab_size=min(vocab_size, 256))
    return model


def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """HF greedy continuation (EOS ignored), token by token, no cache tricks."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
    return out[0, len(prompt) :].tolist()
