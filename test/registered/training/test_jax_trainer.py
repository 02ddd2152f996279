"""The JAX policy trainer against the Megatron one on the same model and batch (log-probs, RL and SFT steps with
warm-up + cosine schedule, weight decay and clipping), and its own contract: snapshots, offload/onload,
checkpoint save/load continuing bit-identically, HF buckets, and --train-backend selection."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from slime.testing.ci_register import register_cpu_ci

register_cpu_ci(est_time=90, suite="base-b-test-cpu")

pytest.importorskip("optax", reason="the JAX trainer needs jax and optax (pip install 'slime[test]')")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))

from tiny_hf import init_rank, make_tiny_model, run_ranks  # noqa: E402

SETTINGS = dict(lr=1e-3, lr_warmup_steps=1, lr_decay_steps=4, lr_decay_style="cosine", weight_decay=0.1,
                clip_grad=0.5, entropy_coef=0.01, use_kl_loss=True, kl_loss_coef=0.1, loss_reduction="sample",
                adam_beta2=0.99)  # fmt: skip


def _batch():
    from slime.training.batch import TrainBatch
    from slime.types import Sample

    rng = np.random.default_rng(1)
    samples = [
        Sample(index=i, tokens=rng.integers(0, 256, size=8 + 3 * i).tolist(), response_length=2 + 2 * i,
               advantage=(-1.0) ** i * (0.5 + i), loss_mask=[1] * (1 + 2 * i) + [0])
        for i in range(4)
    ]  # fmt: skip
    return TrainBatch.from_samples(samples, pad_token_id=0)


def _steps(trainer, batch):
    """log-probs, then: ref snapshot, SFT step at a fixed lr, fresh optimizer (as the loop does after the SFT
    warm-up), three RL steps on the schedule."""
    log_probs, _ = trainer.compute_log_probs(batch)
    trainer.snapshot("ref")
    metrics = [trainer.sft_step(batch, lr=5e-4)]
    trainer.reset_optimizer()
    for _ in range(3):
        batch.ref_log_probs, _ = trainer.compute_log_probs(batch, "ref")
        metrics.append(trainer.train_step(batch))
    return log_probs, metrics, {n: t.clone() for n, t in trainer.hf_named_tensors()}


def _megatron(rank, world, port, folder):
    from slime.training.actor import PolicyTrainer
    from slime.training.config import TrainerConfig

    backend, _ = init_rank(rank, world, port, 1)
    return _steps(PolicyTrainer(TrainerConfig(hf_checkpoint=str(folder), **SETTINGS), backend), _batch())


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    make_tiny_model("qwen2", folder, seed=5)
    return folder


def _jax_trainer(folder, **overrides):
    import jax

    from slime.training.config import TrainerConfig
    from slime.training.jax.trainer import JaxPolicyTrainer

    return JaxPolicyTrainer(TrainerConfig(hf_checkpoint=str(folder), **{**SETTINGS, **overrides}), jax.devices())


def test_matches_the_megatron_trainer(model):
    (mg_lp, mg_metrics, mg_params), = run_ranks(_megatron, 1, model)  # fmt: skip
    lp, metrics, params = _steps(_jax_trainer(model), _batch())
    for a, b in zip(lp, mg_lp):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=0)
    for ours, theirs in zip(metrics, mg_metrics):
        assert sorted(ours) == sorted(theirs)  # the same metric names reach the loop's log
        assert ours["lr"] == pytest.approx(theirs["lr"], rel=1e-6)
        for key in ("loss", "grad_norm", "pg_loss", "kl", "entropy"):
            if key in theirs:
                assert ours[key] == pytest.approx(theirs[key], rel=1e-4, abs=1e-6), key
    assert [m["lr"] for m in metrics] == pytest.approx([5e-4, 0.0, 1e-3, 7.5e-4])  # fixed SFT lr, then warm-up, cosine
    for name, value in mg_params.items():
        torch.testing.assert_close(params[name], value, atol=2e-5, rtol=1e-4)


def test_checkpoint_resumes_bit_identically_and_offload_round_trips(model, tmp_path):
    batch = _batch()
    trainer = _jax_trainer(model)
    trainer.snapshot("ref")
    batch.ref_log_probs, _ = trainer.compute_log_probs(batch, "ref")
    trainer.train_step(batch)
    trainer.save(tmp_path / "ckpt", extra={"rollout_id": 1})
    trainer.offload()
    trainer.onload()
    expected = [trainer.train_step(batch) for _ in range(2)]
    resumed = _jax_trainer(model)
    assert resumed.load(tmp_path / "ckpt") == 1 and resumed.has_snapshot("ref")
    assert [resumed.train_step(batch) for _ in range(2)] == expected
    for (n, a), (_, b) in zip(trainer.hf_named_tensors(), resumed.hf_named_tensors()):
        assert torch.equal(a, b), n
    buckets = list(trainer.hf_weight_buckets(bucket_bytes=40_000))
    assert len(buckets) > 1 and sorted(n for b in buckets for n, _ in b) == sorted(dict(trainer.hf_named_tensors()))


def test_unknown_snapshot_and_wrong_checkpoint_are_one_line(model, tmp_path):
    trainer = _jax_trainer(model)
    with pytest.raises(ValueError, match="expected one of actor, ref, old"):
        trainer.compute_log_probs(_batch(), "nope")
    (tmp_path / "step_00000001").mkdir()
    (tmp_path / "step_00000001" / "meta.json").write_text('{"step": 1, "tp_size": 1}')
    with pytest.raises(ValueError, match="not a JAX-trainer checkpoint"):
        trainer.load(tmp_path)


def test_train_backend_selection():
    from slime.backends import get_backend_class
    from slime.config import ConfigError, parse_config
    from slime.settings import family_request
    from slime.training.family import trainer_family

    flags = ["--hf-checkpoint", "m", "--prompt-data", "p", "--rm-type", "math"]
    assert get_backend_class("cpu").capabilities.trainer_families == ("megatron", "jax")
    assert get_backend_class("tpu").capabilities.trainer_families == ("jax",)
    assert trainer_family(family_request(parse_config(flags)), "cpu", ("megatron", "jax")) == "megatron"
    assert (
        trainer_family(family_request(parse_config([*flags, "--train-backend", "jax"])), "cpu", ("megatron", "jax"))
        == "jax"
    )
    assert trainer_family(family_request(parse_config(flags)), "tpu", ("jax",)) == "jax"
    with pytest.raises(ConfigError, match="--train-backend megatron: the tpu hardware backend runs jax trainers"):
        trainer_family(family_request(parse_config([*flags, "--train-backend", "megatron"])), "tpu", ("jax",))
    with pytest.raises(ConfigError, match="--bf16 is the megatron trainer's"):
        trainer_family(family_request(parse_config([*flags, "--bf16"])), "tpu", ("jax",))
