"""PolicyTrainer / CriticTrainer under plain gloo launches: TP=2 and DP=2 reproduce TP=1, ref snapshots,
bit-identical resume in a new process, keep-last-N, save_hf loading in transformers, SFT, critic."""

import sys
from pathlib import Path

import pytest
import torch

from slime.testing.ci_register import register_cpu_ci

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
from tiny_hf import init_rank, make_tiny_model, run_ranks

register_cpu_ci(est_time=75, suite="base-b-test-cpu")


def make_samples():
    from slime.types import Sample

    g = torch.Generator().manual_seed(0)
    samples = []
    for i in range(8):
        prompt = torch.randint(2, 256, (5 + i % 4,), generator=g).tolist()
        s = Sample(tokens=prompt, index=i, reward=float(i % 2), advantage=1.0 if i % 2 else -1.0)
        response = torch.randint(2, 256, (3 + i % 5,), generator=g).tolist()
        s.append_response(response, [-5.5] * len(response), trainable=True)
        if i == 3:
            s.loss_mask[1] = 0  # an injected (tool) token
        samples.append(s)
    return samples


def trainer_config(folder, tp, **overrides):
    from slime.training.config import TrainerConfig

    settings = dict(
        hf_checkpoint=str(folder), tensor_parallel_size=tp, lr=2e-3, min_lr=1e-4, lr_warmup_steps=1, lr_decay_steps=6,
        lr_decay_style="cosine", weight_decay=0.01, clip_grad=0.5, max_tokens_per_micro_batch=40, use_kl_loss=True,
        kl_loss_coef=0.1, entropy_coef=0.01, use_tis=True, eps_clip_high=0.28, keep_last_n=2,
    )  # fmt: skip
    settings.update(overrides)
    return TrainerConfig(**settings)


def local_batch(layout):
    from slime.training.batch import TrainBatch

    return TrainBatch.from_samples(make_samples(), pad_token_id=0).split_for_dp(layout.dp_rank, layout.dp_size)


def rl_run(rank, world, port, folder, tp, ckpt, steps, save_at, resume_from, hf_out):
    """GRPO-style steps; returns per-step metrics, final log-probs, and (ref, initial) log-probs."""
    from slime.training.actor import PolicyTrainer

    backend, layout = init_rank(rank, world, port, tp)
    trainer = PolicyTrainer(trainer_config(folder, tp), backend)
    batch = local_batch(layout)
    initial, _ = trainer.compute_log_probs(batch)
    trainer.snapshot("ref")
    if resume_from is not None:
        assert trainer.load(resume_from) == 2
    history = []
    while trainer.step < steps:
        batch.ref_log_probs, _ = trainer.compute_log_probs(batch, "ref")
        batch.old_log_probs, _ = trainer.compute_log_probs(batch, "actor")
        history.append(trainer.train_step(batch))
        if trainer.step in save_at:
            trainer.save(ckpt)
    final, entropy = trainer.compute_log_probs(batch)
    ref, _ = trainer.compute_log_probs(batch, "ref")
    if hf_out:
        trainer.save_hf(hf_out)
    buckets = [[name for name, _ in b] for b in trainer.hf_weight_buckets(bucket_bytes=40_000)]
    return {"history": history, "final": final, "entropy": entropy, "ref": ref, "initial": initial,
            "indices": batch.sample_indices, "buckets": buckets}  # fmt: skip


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen3")
    make_tiny_model("qwen3", folder, seed=11, tokenizer=True)
    return folder


@pytest.fixture(scope="module")
def straight_tp1(model_dir, tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("ckpt")
    hf_out = tmp_path_factory.mktemp("hf_out") / "model"
    result = run_ranks(rl_run, 1, str(model_dir), 1, str(ckpt), 4, (1, 2, 3), None, str(hf_out))[0]
    return result, ckpt, hf_out


def by_sample(results, key):
    """Per-sample tensors from every DP rank, in global sample order."""
    merged = {}
    for r in results:
        merged.update(zip(r["indices"], r[key]))
    return [merged[i] for i in sorted(merged)]


def test_tp2_and_dp2_reproduce_tp1(straight_tp1, model_dir, tmp_path):
    reference = straight_tp1[0]
    assert [m["step"] for m in reference["history"]] == [1.0, 2.0, 3.0, 4.0]
    assert reference["history"][-1]["grad_norm"] > 0
    for tp in (2, 1):  # TP=2 on two ranks, then DP=2 on two ranks
        results = run_ranks(rl_run, 2, str(model_dir), tp, str(tmp_path / f"c{tp}"), 4, (), None, None)
        for ours, theirs in zip(results[0]["history"], reference["history"]):
            for key in ("loss", "pg_loss", "kl", "entropy", "clip_frac", "grad_norm", "lr", "tis_weight"):
                assert ours[key] == pytest.approx(theirs[key], abs=2e-5, rel=2e-4), (tp, key)
        for ours, theirs in zip(by_sample(results, "final"), reference["final"]):
            assert torch.allclose(ours, theirs, atol=2e-5)


def test_reference_snapshot_is_the_initial_policy(straight_tp1):
    result = straight_tp1[0]
    for ref, initial, final in zip(result["ref"], result["initial"], result["final"]):
        assert torch.equal(ref, initial)
        assert not torch.allclose(final, initial, atol=1e-4)
    assert result["history"][0]["kl"] == 0.0 and result["history"][-1]["kl"] > 0.0
    assert result["history"][0]["lr"] == 0.0 and result["history"][1]["lr"] == pytest.approx(2e-3)  # warmup


def test_resume_in_a_new_process_is_bit_identical(straight_tp1, model_dir):
    reference, ckpt, _ = straight_tp1
    assert sorted(p.name for p in ckpt.iterdir()) == ["latest", "step_00000002", "step_00000003"]  # keep-last-2
    assert (ckpt / "latest").read_text().strip() == "step_00000003"
    resumed = run_ranks(rl_run, 1, str(model_dir), 1, str(ckpt / "x"), 4, (), str(ckpt / "step_00000002"), None)[0]
    assert resumed["history"] == reference["history"][2:]
    for a, b in zip(resumed["final"], reference["final"]):
        assert torch.equal(a, b)


def test_interrupted_save_is_never_loaded(tmp_path):
    from slime.training import checkpoint

    (tmp_path / "step_00000004").mkdir()
    (tmp_path / "step_00000004" / "meta.json").write_text("{}")
    (tmp_path / ".tmp_step_00000006").mkdir()  # killed half-way: never renamed
    (tmp_path / "step_00000005").mkdir()  # no meta.json: not complete
    assert checkpoint.resolve_checkpoint(tmp_path).name == "step_00000004"
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        checkpoint.resolve_checkpoint(tmp_path / "step_00000005")


def test_save_hf_loads_in_transformers_with_the_same_log_probs(straight_tp1):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result, _, hf_out = straight_tp1
    assert AutoTokenizer.from_pretrained(str(hf_out)).pad_token == "<pad>"
    model = AutoModelForCausalLM.from_pretrained(str(hf_out), dtype=torch.float32).eval()
    for sample, expected in zip(make_samples(), result["final"]):
        with torch.no_grad():
            logits = model(torch.tensor([sample.tokens])).logits[0]
        log_probs = torch.log_softmax(logits[:-1], dim=-1).gather(1, torch.tensor(sample.tokens[1:]).unsqueeze(1))[:, 0]
        assert torch.allclose(log_probs[-sample.response_length :], expected, atol=1e-5)
    names = [n for bucket in result["buckets"] for n in bucket]
    assert len(names) == len(set(names)) == 2 + 2 * 11 and len(result["buckets"]) > 1


def sft_and_critic(rank, world, port, folder):
    from slime.training.actor import PolicyTrainer
    from slime.training.advantages import gae, token_rewards
    from slime.training.critic import CriticTrainer

    backend, layout = init_rank(rank, world, port, world)
    policy = PolicyTrainer(
        trainer_config(folder, world, lr=5e-3, lr_warmup_steps=0, lr_decay_style="constant"), backend
    )
    batch = local_batch(layout)
    sft = [policy.sft_step(batch)["loss"] for _ in range(4)]
    critic = CriticTrainer(
        trainer_config(folder, world, lr=5e-3, lr_warmup_steps=0, lr_decay_style="constant"), backend
    )
    values = critic.compute_values(batch)
    mask = torch.nn.utils.rnn.pad_sequence(batch.loss_masks, batch_first=True)
    padded_values = torch.nn.utils.rnn.pad_sequence(values, batch_first=True)
    rewards = token_rewards(torch.tensor(batch.rewards), mask)
    _, returns = gae(rewards, padded_values, gamma=1.0, lam=0.95, mask=mask)
    batch.returns = [returns[i, :n] for i, n in enumerate(batch.response_lengths)]
    batch.values = values
    value_losses = []
    for _ in range(4):
        value_losses.append(critic.train_step(batch)["value_loss"])
        batch.values = critic.compute_values(batch)
    return sft, [float(v.abs().max()) for v in values], value_losses


def test_sft_and_critic_steps_learn_at_tp2(model_dir):
    sft, initial_values, value_losses = run_ranks(sft_and_critic, 2, str(model_dir))[0]
    assert sft[-1] < sft[0] - 0.05, sft
    assert max(initial_values) == 0.0  # the value head starts at zero
    assert value_losses[-1] < value_losses[0], value_losses


def passthrough_run(rank, world, port, folder):
    from slime.training.actor import PolicyTrainer

    backend, _ = init_rank(rank, world, port, 1)
    trainer = PolicyTrainer(
        trainer_config(
            folder,
            1,
            megatron_overrides=(("adam_eps", 1e-5), ("hidden_dropout", 0.25), ("barrier_with_L1_time", False)),
        ),
        backend,
    )
    return {
        "hidden_dropout": trainer.model.config.hidden_dropout,
        "eps": [g["eps"] for g in trainer.optimizer.param_groups],
        "clip": trainer.optimizer.config.clip_grad,
        # a field of both config classes reaches both
        "barrier": (trainer.model.config.barrier_with_L1_time, trainer.optimizer.config.barrier_with_L1_time),
    }


def test_megatron_passthrough_flags_reach_the_model_and_the_optimizer(model_dir):
    # `slime train --hidden-dropout 0.25 --adam-eps 1e-5` arrive as TrainerConfig.megatron_overrides
    result = run_ranks(passthrough_run, 1, str(model_dir))[0]
    assert result == {"hidden_dropout": 0.25, "eps": [1e-5, 1e-5], "clip": 0.5, "barrier": (False, False)}


def bf16_run(rank, world, port, folder):
    from slime.training.actor import PolicyTrainer

    backend, layout = init_rank(rank, world, port, 1)
    plain = PolicyTrainer(trainer_config(folder, 1, use_kl_loss=False, use_tis=False), backend)
    mixed = PolicyTrainer(
        trainer_config(folder, 1, use_kl_loss=False, use_tis=False, compute_dtype="bfloat16"), backend
    )
    batch = local_batch(layout)
    reference, _ = plain.compute_log_probs(batch)
    before, _ = mixed.compute_log_probs(batch)
    sft = [mixed.sft_step(batch, lr=5e-3)["loss"] for _ in range(4)]
    return {
        "diff": max(float((a - b).abs().max()) for a, b in zip(reference, before)),
        "dtypes": {lp.dtype for lp in before} | {p.dtype for p in mixed.model.parameters()},
        "sft": sft,
    }


def test_bf16_computes_in_bfloat16_and_keeps_float32_weights(model_dir):
    """--bf16: log-probs within bf16 rounding of the float32 trainer's (and not equal: the matmuls really ran in
    bf16), returned in float32; the weights stay float32 and SFT steps still learn."""
    result = run_ranks(bf16_run, 1, str(model_dir))[0]
    assert 0.0 < result["diff"] < 5e-2, result["diff"]
    assert result["dtypes"] == {torch.float32}
    assert result["sft"][-1] < result["sft"][0] - 0.05, result["sft"]


def lease_run(rank, world, port, folder):
    """A train step and a no-grad pass with `between_layers` polling a CoreLease whose rollout finishes at the
    second poll: the thread count each poll saw, on which thread, and the count after the phase."""
    import threading

    from slime.cores import CoreBudget, CoreLease
    from slime.training.actor import PolicyTrainer

    backend, layout = init_rank(rank, world, port, 1)
    trainer = PolicyTrainer(trainer_config(folder, 1, use_kl_loss=False, use_tis=False), backend)
    batch = local_batch(layout)
    budget = CoreBudget(train_procs=1, engine_procs=1, overlapped=True, cores_per_node=2)  # 1 thread, alone 2
    seen, threads = {"train": [], "log_probs": []}, set()
    torch.set_num_threads(3)  # what the thread has outside the phase: neither the share nor the whole
    for call, run in (("train", trainer.train_step), ("log_probs", trainer.compute_log_probs)):
        with budget.phase("train"):
            polls = seen[call]
            lease = CoreLease(budget, done=lambda polls=polls: len(polls) >= 2)

            def poll(polls=polls, lease=lease):
                polls.append(torch.get_num_threads())
                threads.add(threading.get_ident())
                lease.poll()

            trainer.between_layers = poll
            run(batch)
            trainer.between_layers = None
    micro_batches = len(list(trainer._micro_batches(batch)))
    return {
        "seen": seen,
        "layers": len(trainer.model.decoder.layers),
        "micro_batches": micro_batches,
        "one_thread": threads == {threading.get_ident()},
        "after": torch.get_num_threads(),
    }


def test_async_trainer_takes_the_engines_cores_between_layers_once_the_rollout_is_done(model_dir):
    """--async (slime.cores.CoreLease): the trainer polls before every layer's forward and its backward,
    on the working thread (a CPU backward runs on the caller's thread, where torch's thread count applies);
    from the poll that sees the rollout done it computes with every core, and the phase gives the count back."""
    import os

    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs two cores to lend one")
    result = run_ranks(lease_run, 1, str(model_dir))[0]
    layers, micro = result["layers"], result["micro_batches"]
    train, log_probs = result["seen"]["train"], result["seen"]["log_probs"]
    assert len(train) == 2 * layers * micro  # forward and backward of every layer of every micro-batch
    assert len(log_probs) == layers * micro  # no backward without gradients
    assert train[:2] == [1, 1] and set(train[2:]) == {2}
    assert log_probs[:2] == [1, 1] and set(log_probs[2:]) == {2}
    assert result["one_thread"] and result["after"] == 3
