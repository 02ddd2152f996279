"""`slime quickstart --lora`: supervised warm-up of the whole model, then GRPO with LoRA adapters on it.

Two `slime train` runs: the first is the quickstart's own SFT warm-up, then one RL step at learning rate 0 (the
schedule's warm-up starts there), exporting the warmed-up model with --save-hf; the second runs GRPO on that
folder with --lora-rank (base frozen, the adapters alone trained and synced to the engine) and writes the adapter
in PEFT's format with --save-lora. Its step-0 evaluation is the warmed-up model's (B starts at zero).
"""

from __future__ import annotations

import sys
from pathlib import Path

SFT_FOLDER, SFT_RUN, ADAPTER = "sft_model", "sft_run", "adapter"
SFT_ONLY = ("--sft-warmup-steps", "--sft-data", "--sft-lr", "--sft-batch-size", "--sft-stop-reward", "--sft-eval-set")


def phases(args, folder: Path, files: dict, bf16: bool, train_flags) -> tuple[list[str], list[str]]:
    """(warm-up flags, LoRA GRPO flags)."""
    # after the user's extra flags (the last of a flag wins): this run's own export and folder
    warm_up = train_flags(args, folder, files, bf16) + [
        "--num-rollout", "1", "--save-hf", str(folder / SFT_FOLDER), "--output-dir", str(folder / SFT_RUN),
    ]  # fmt: skip
    lora = dict.fromkeys(SFT_ONLY, False)
    lora |= {
        "--hf-checkpoint": folder / SFT_FOLDER,
        "--lora-rank": args.lora_rank,
        "--lora-alpha": 2 * args.lora_rank,
        "--lr": args.lora_lr,
        "--save-lora": folder / ADAPTER,
    }
    return warm_up, train_flags(args, folder, files, bf16, overrides=lora)


def run(args, folder: Path, files: dict, bf16: bool, train_flags, train_main) -> int:
    warm_up, grpo = phases(args, folder, files, bf16, train_flags)
    for flags in (warm_up, grpo):
        print("slime train " + " ".join(flags), file=sys.stderr)
        code = train_main(flags)
        if code != 0:
            return code
    return 0
