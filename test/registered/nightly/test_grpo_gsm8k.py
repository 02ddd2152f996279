"""Nightly accuracy on GPU / TPU: GRPO on a small public model with a GSM8K-style dataset, evaluated before
and after; the test accuracy must rise by the stored minimum gain (accuracy_thresholds.json).

The machine provides the model and the data (there is no hub access in CI):
    SLIME_NIGHTLY_MODEL       an HF checkpoint folder, e.g. Qwen2.5-0.5B-Instruct
    SLIME_NIGHTLY_GSM8K       training prompts (.jsonl or .parquet with "prompt" and "label")
    SLIME_NIGHTLY_GSM8K_TEST  held-out prompts in the same format
Without them the test is skipped, saying which is missing.
"""

import json
import os
from pathlib import Path

import pytest

from slime.testing.ci_register import register_cuda_ci, register_rocm_ci, register_tpu_ci

register_cuda_ci(est_time=3600, suite="nightly-accuracy-1-gpu", nightly=True)
register_rocm_ci(est_time=3600, suite="nightly-accuracy-1-gpu-amd", nightly=True)
register_tpu_ci(est_time=3600, suite="nightly-accuracy-tpu", nightly=True)

THRESHOLDS = json.loads((Path(__file__).with_name("accuracy_thresholds.json")).read_text())["gsm8k_grpo"]
NEEDED = ("SLIME_NIGHTLY_MODEL", "SLIME_NIGHTLY_GSM8K", "SLIME_NIGHTLY_GSM8K_TEST")


def test_grpo_raises_gsm8k_accuracy(tmp_path):
    missing = [name for name in NEEDED if not os.environ.get(name) or not Path(os.environ[name]).exists()]
    if missing:
        pytest.skip(f"set {', '.join(missing)} to an existing model folder / dataset file to run this check")
    from slime.config import parse_config
    from slime.loop import train
    from slime.run_log import read_metrics

    flags = [
        "--hf-checkpoint", os.environ["SLIME_NIGHTLY_MODEL"], "--prompt-data", os.environ["SLIME_NIGHTLY_GSM8K"],
        "--eval-prompt-data", "gsm8k", os.environ["SLIME_NIGHTLY_GSM8K_TEST"], "--eval-interval", "10",
        "--apply-chat-template", "--rm-type", "math", "--num-rollout", "40", "--rollout-batch-size", "32",
        "--n-samples-per-prompt", "8", "--global-batch-size", "256", "--rollout-max-response-len", "512",
        "--lr", "1e-6", "--use-kl-loss", "--kl-loss-coef", "0.001", "--use-dynamic-batch-size",
        "--max-tokens-per-gpu", "8192", "--rollout-dtype", "bfloat16", "--output-dir", str(tmp_path / "run"), "--no-progress",
    ]  # fmt: skip
    train(parse_config(flags))
    evals = [r["eval/gsm8k/reward_mean"] for r in read_metrics(tmp_path / "run") if r.get("phase") == "eval"]
    gain = sum(evals[-2:]) / len(evals[-2:]) - evals[0]
    assert gain >= THRESHOLDS["min_gain"] - THRESHOLDS["allowed_float"], (
        f"GSM8K accuracy went {evals[0]:.1%} -> {evals[-1]:.1%}"
    )
