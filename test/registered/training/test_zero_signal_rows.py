"""PolicyTrainer.train_step leaves out samples whose advantages are all zero (GRPO groups with equal rewards): the
update is the one the whole batch gives (same denominator), on DP=2 ranks that keep different numbers of rows."""

import sys
from pathlib import Path

import pytest
import torch

from slime.testing.ci_register import register_cpu_ci

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
from tiny_hf import init_rank, make_tiny_model, run_ranks

register_cpu_ci(est_time=60, suite="base-b-test-cpu")

WITH_SIGNAL = {1: 1.0, 2: -1.0, 5: 0.5}  # rank 0 (samples 0, 2, 4, 6) keeps one row, rank 1 (1, 3, 5, 7) two


def samples():
    from slime.types import Sample

    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(8):
        s = Sample(tokens=torch.randint(2, 256, (5 + i % 3,), generator=g).tolist(), index=i, reward=0.0)
        response = torch.randint(2, 256, (3 + i % 4,), generator=g).tolist()
        s.append_response(response, [-5.5] * len(response), trainable=True)
        out.append(s)
    return out


def one_step(rank, world, port, folder, keep_all):
    from slime.training.actor import PolicyTrainer
    from slime.training.batch import TrainBatch
    from slime.training.config import TrainerConfig

    backend, layout = init_rank(rank, world, port, 1)
    config = TrainerConfig(
        hf_checkpoint=folder, tensor_parallel_size=1, lr=1e-2, lr_warmup_steps=0, lr_decay_steps=2,
        max_tokens_per_micro_batch=12, use_kl_loss=False, entropy_coef=0.0, use_tis=False,
    )  # fmt: skip
    trainer = PolicyTrainer(config, backend)
    batch = TrainBatch.from_samples(samples(), pad_token_id=0)
    batch.advantages = [torch.full((n,), WITH_SIGNAL.get(i, 0.0)) for i, n in enumerate(batch.response_lengths)]
    batch.returns = [a.clone() for a in batch.advantages]
    shard = batch.split_for_dp(layout.dp_rank, layout.dp_size)
    metrics = trainer.train_step(shard, keep_log_probs=keep_all)  # keeping log-probs trains every row
    weights = {name: t.detach().clone() for bucket in trainer.hf_weight_buckets(1 << 30) for name, t in bucket}
    return {"metrics": metrics, "weights": weights}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen3")
    make_tiny_model("qwen3", folder, seed=5, tokenizer=True)
    return str(folder)


def test_rows_without_signal_change_nothing_but_the_cost(model_dir):
    every_row = run_ranks(one_step, 2, model_dir, True)
    with_signal = run_ranks(one_step, 2, model_dir, False)
    full, skipped = every_row[0]["metrics"], with_signal[0]["metrics"]
    for key in ("loss", "pg_loss", "grad_norm", "clip_frac", "ppo_kl"):
        assert skipped[key] == pytest.approx(full[key], rel=1e-5, abs=1e-7), key
    assert full["grad_norm"] > 0
    lengths = [3 + i % 4 + 5 + i % 3 for i in range(8)]
    assert full["tokens"] == sum(lengths) and skipped["tokens"] == sum(lengths[i] for i in WITH_SIGNAL)
    for name, value in every_row[0]["weights"].items():
        assert torch.allclose(with_signal[0]["weights"][name], value, atol=1e-6), name
        assert torch.equal(with_signal[1]["weights"][name], with_signal[0]["weights"][name])  # ranks agree
