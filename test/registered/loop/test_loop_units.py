"""The loop's pure parts: bundle layout, batch advantages (closed form), --ci-test invariants, per-sample
seeds, metrics-file resume, schedules, flag mapping and the CLI's one-line errors."""

import json
import math

import pytest
import torch

from slime.config import parse_config
from slime.testing.ci_register import register_cpu_ci
from slime.types import Sample

register_cpu_ci(est_time=10, suite="base-a-test-cpu")


# ---- layout -------------------------------------------------------------------------------------------
def test_layout_disaggregated_colocated_and_critic():
    from slime.ray.cluster import ClusterError, Slot, plan_layout

    split = plan_layout(actor_devices=2, critic_devices=0, rollout_devices=2, devices_per_engine=1, colocate=False)
    assert split.num_bundles == 4
    assert [s.bundle_index for s in split.actor] == [0, 1] and [s.bundle_index for s in split.rollout] == [2, 3]
    assert all(s.share == 1.0 for s in split.actor + split.rollout)

    shared = plan_layout(2, 2, 2, 1, colocate=True)
    assert shared.num_bundles == 4  # actor 0-1, critic 2-3, engines on the actor's bundles
    assert [s.bundle_index for s in shared.rollout] == [0, 1] and [s.bundle_index for s in shared.critic] == [2, 3]
    assert all(s.share + r.share <= 1.0 for s, r in zip(shared.actor, shared.rollout))

    tp_engines = plan_layout(1, 0, 4, 2, colocate=False)
    assert tp_engines.rollout == (Slot(1, 1.0), Slot(3, 1.0)) and tp_engines.num_bundles == 5
    with pytest.raises(ClusterError, match="--rollout-num-gpus 3 is not a multiple of --rollout-num-gpus-per-engine 2"):
        plan_layout(1, 0, 3, 2, False)
    with pytest.raises(ClusterError, match="must be <= the trainer's 1"):
        plan_layout(1, 0, 2, 1, True)


# ---- advantages over a batch --------------------------------------------------------------------------
def batch_of(rewards, lengths, masks=None):
    from slime.training.batch import TrainBatch

    samples = []
    for i, (r, n) in enumerate(zip(rewards, lengths)):
        s = Sample(tokens=[1, 2] + [3] * n, response_length=n, reward=r, index=i)
        if masks is not None:
            s.loss_mask = masks[i]
        samples.append(s)
    batch = TrainBatch.from_samples(samples, 0)
    batch.rewards = list(map(float, rewards))
    return batch


def test_grpo_groups_by_id_not_by_order():
    from slime.training.experience import AdvantageSettings, compute_advantages

    batch = batch_of([1, 0, 0, 1, 1, 1], [2, 1, 3, 2, 1, 2])
    compute_advantages(AdvantageSettings("grpo"), batch, [0, 1, 0, 1, 2, 2])  # groups {0,2}, {1,3}, {4,5}
    # group {1, 0}: mean 0.5, unbiased std sqrt(0.5); the all-ones group has no spread -> 0
    a = 0.5 / (math.sqrt(0.5) + 1e-6)
    expected = [a, -a, -a, a, 0.0, 0.0]
    for adv, value, n in zip(batch.advantages, expected, [2, 1, 3, 2, 1, 2]):
        assert adv.shape == (n,)
        torch.testing.assert_close(adv, torch.full((n,), value))
    assert batch.returns[0].tolist() == batch.advantages[0].tolist()


def test_dr_grpo_and_masked_tokens():
    from slime.training.experience import AdvantageSettings, compute_advantages

    batch = batch_of([2, 0], [3, 3], masks=[[1, 0, 1], [1, 1, 1]])
    compute_advantages(AdvantageSettings("grpo", normalize_std=False), batch, [7, 7])
    assert batch.advantages[0].tolist() == [1.0, 0.0, 1.0] and batch.advantages[1].tolist() == [-1.0, -1.0, -1.0]


def test_ppo_gae_against_hand_computation():
    from slime.training.experience import AdvantageSettings, compute_advantages

    batch = batch_of([1.0], [2])
    batch.values = [torch.tensor([0.5, 0.25])]
    compute_advantages(AdvantageSettings("ppo", gamma=0.9, lambd=0.8), batch, [0])
    # rewards [0, 1]; delta_1 = 1 - 0.25 = 0.75; delta_0 = 0 + 0.9 * 0.25 - 0.5 = -0.275
    # A_1 = 0.75; A_0 = -0.275 + 0.9 * 0.8 * 0.75 = 0.265; returns = A + V
    torch.testing.assert_close(batch.advantages[0], torch.tensor([0.265, 0.75]))
    torch.testing.assert_close(batch.returns[0], torch.tensor([0.765, 1.0]))


def test_reinforce_pp_with_kl_shaping_and_baseline():
    from slime.training.experience import AdvantageSettings, compute_advantages

    batch = batch_of([1.0, 0.0], [2, 1])
    batch.old_log_probs = [torch.tensor([-1.0, -1.0]), torch.tensor([-2.0])]
    batch.ref_log_probs = [torch.tensor([-1.5, -1.0]), torch.tensor([-1.0])]
    compute_advantages(AdvantageSettings("reinforce_plus_plus", kl_coef=0.1, kl_type="k1"), batch, [0, 1])
    # token rewards: k1 = old - ref -> [0.5, 0] and [-1]; r = -0.1 k1 (+ reward at the end)
    # sample 0: [-0.05, 1.0] -> returns [0.95, 1.0]; sample 1: [0.1] -> [0.1]; whitened over the 3 tokens
    raw = torch.tensor([0.95, 1.0, 0.1])
    white = (raw - raw.mean()) / torch.sqrt(((raw - raw.mean()) ** 2).mean() + 1e-8)
    torch.testing.assert_close(torch.cat(batch.advantages), white)

    base = batch_of([1.0, 0.0, 3.0, 1.0], [1, 1, 1, 1])
    compute_advantages(AdvantageSettings("reinforce_plus_plus_baseline"), base, [0, 0, 1, 1])
    centered = torch.tensor([0.5, -0.5, 1.0, -1.0])
    torch.testing.assert_close(torch.cat(base.advantages), centered / torch.sqrt((centered**2).mean() + 1e-8))


def test_settings_refuse_kl_shaping_with_group_estimators():
    from slime.training.experience import AdvantageSettings

    with pytest.raises(ValueError, match="--kl-coef .* needs a token-level estimator .* use --use-kl-loss"):
        AdvantageSettings("grpo", kl_coef=0.1)


# ---- --ci-test invariants -----------------------------------------------------------------------------
def test_invariants_pass_and_fail_with_numbers():
    from slime.invariants import InvariantViolation, check_first_step, check_ranges, logprob_agreement

    masks = [torch.tensor([1.0, 1.0]), torch.tensor([1.0, 0.0])]
    trainer = [torch.tensor([-0.5, -1.0]), torch.tensor([-2.0, 99.0])]  # the masked 99 is never looked at
    close = [torch.tensor([-0.5001, -1.0]), torch.tensor([-2.0, 0.0])]
    metrics = logprob_agreement(trainer, close, masks)
    assert metrics["ci/logprob_abs_diff_max"] == pytest.approx(1e-4, rel=1e-3)
    check_first_step(metrics, kl_to_ref=0.0, dtype="float32")
    far = logprob_agreement(trainer, [torch.tensor([-0.5, -1.3]), torch.tensor([-2.0, 0.0])], masks)
    with pytest.raises(
        InvariantViolation,
        match=r"differ from the rollout engine's by 0.1 per token on average \(max 0.3\); expected <= 0.001",
    ):
        check_first_step(far, kl_to_ref=None, dtype="float32")
    with pytest.raises(InvariantViolation, match=r"KL\(policy \|\| reference\) = 0.01"):
        check_first_step(metrics, kl_to_ref=0.01, dtype="float32")

    ok = check_ranges(trainer, [torch.tensor([0.1, 2.0]), torch.tensor([0.5, -9.0])], masks, vocab_size=16)
    assert ok["ci/logprob_min"] == -2.0
    with pytest.raises(InvariantViolation, match="a log-prob of 0.5 > 0"):
        check_ranges([torch.tensor([0.5, -1.0])], [torch.tensor([1.0, 1.0])], [torch.ones(2)], 16)
    with pytest.raises(InvariantViolation, match=r"entropies in \[0, 3\], outside \[0, log V = 2.77\]"):
        check_ranges([torch.tensor([-1.0, -1.0])], [torch.tensor([0.0, 3.0])], [torch.ones(2)], 16)


# ---- seeds, schedules, metrics file -------------------------------------------------------------------
def test_sample_seed_depends_on_sample_and_progress_only():
    from slime.rollout.rollout import sample_seed

    a, b = Sample(index=3), Sample(index=4)
    assert sample_seed(1, a) == sample_seed(1, Sample(index=3)) != sample_seed(1, b)
    assert sample_seed(1, a) != sample_seed(2, a)
    a.response_length = 2
    assert sample_seed(1, a) != sample_seed(1, Sample(index=3))


def test_should_runs_every_interval_and_at_the_end():
    from slime.loop_steps import should

    assert [s for s in range(7) if should(3, s, 7)] == [2, 5, 6]
    assert not any(should(None, s, 7) for s in range(7))


def test_metrics_file_is_rewound_on_resume(tmp_path):
    from slime.run_log import RunLog, read_metrics
    from slime.settings import log_settings

    config = parse_config(
        [
            "--hf-checkpoint",
            "m",
            "--prompt-data",
            "p.jsonl",
            "--rm-type",
            "math",
            "--output-dir",
            str(tmp_path),
            "--no-progress",
        ]
    )
    log = RunLog(log_settings(config))
    log.log(0, {"train/loss": 1.0}, phase="sft")
    for step in range(4):
        log.log(step, {"rollout/reward_mean": step / 10})
    log.log(2, {"eval/x/reward_mean": 0.5}, phase="eval")
    log.log(4, {"eval/x/reward_mean": 0.7}, phase="eval")
    log.close()
    RunLog(log_settings(config), start_step=2).close()
    kept = [(r["phase"], r["step"]) for r in read_metrics(tmp_path)]
    assert kept == [("sft", 0), ("rl", 0), ("rl", 1), ("eval", 2)]
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[1])["rollout/reward_mean"] == 0.0
    RunLog(log_settings(config)).close()  # a fresh run into the same folder does not inherit the old run's rows
    assert read_metrics(tmp_path) == []


class RecordingWandb:
    def __init__(self):
        self.defined, self.logged = {}, []

    def define_metric(self, name, step_metric=None):
        self.defined[name] = step_metric

    def log(self, row):
        self.logged.append(row)

    def finish(self):
        pass


def test_wandb_plots_each_phase_against_its_own_step(tmp_path):
    from slime.run_log import RunLog
    from slime.settings import log_settings

    config = parse_config(
        [
            "--hf-checkpoint",
            "m",
            "--prompt-data",
            "p.jsonl",
            "--rm-type",
            "math",
            "--output-dir",
            str(tmp_path),
            "--no-progress",
        ]
    )
    log = RunLog(log_settings(config))
    log._wandb, log._wandb_defined = RecordingWandb(), set()
    for step in range(3):
        log.log(step, {"train/loss": 1.0}, phase="sft")
    log.log(0, {"train/loss": 0.5, "rollout/reward_mean": 0.25})
    log.close()
    assert log._wandb.defined == {"sft/*": "sft/step", "train/*": "rollout_step", "rollout/*": "rollout_step"}
    assert log._wandb.logged[-1] == {"rollout_step": 0, "train/loss": 0.5, "rollout/reward_mean": 0.25}
    assert [row["sft/step"] for row in log._wandb.logged[:3]] == [0, 1, 2]


def test_trainer_config_maps_the_flags():
    from slime.settings import trainer_config

    config = parse_config(
        [
            "--hf-checkpoint",
            "m",
            "--prompt-data",
            "p.jsonl",
            "--rm-type",
            "math",
            "--disable-grpo-std-normalization",
            "--calculate-per-token-loss",
            "--rollout-batch-size",
            "4",
            "--n-samples-per-prompt",
            "4",
            "--global-batch-size",
            "8",
            "--num-rollout",
            "5",
            "--lr-warmup-iters",
            "2",
            "--use-dynamic-batch-size",
            "--max-tokens-per-gpu",
            "1024",
            "--eps-clip-high",
            "0.28",
            "--rollout-temperature",
            "0.7",
        ]
    )
    t = trainer_config(config, "actor")
    assert (t.advantage_estimator, t.loss_reduction, t.lr_decay_steps, t.lr_warmup_steps) == ("grpo", "token", 10, 2)
    assert (t.max_tokens_per_micro_batch, t.micro_batch_size, t.eps_clip_high, t.rollout_temperature) == (
        1024,
        None,
        0.28,
        0.7,
    )
    assert trainer_config(config, "critic").seed == t.seed + 1


# ---- the CLI's errors ---------------------------------------------------------------------------------
def run_cli(argv, capsys):
    from slime.train_cli import main

    code = main(argv)
    return code, capsys.readouterr().err.strip()


def test_cli_bad_flags_are_one_line(capsys, tmp_path):
    code, err = run_cli(
        ["--hf-checkpoint", "m", "--prompt-data", "p.jsonl", "--rm-type", "math", "--global-batch-size", "7"], capsys
    )
    assert code == 2 and err.count("\n") == 0
    assert (
        "--rollout-batch-size * --n-samples-per-prompt = 8 * 8 = 64 must be divisible by --global-batch-size 7" in err
    )
    code, err = run_cli(["--hf-checkpoint", str(tmp_path), "--prompt-data", "p.jsonl", "--rm-type", "math"], capsys)
    assert (
        code == 2
        and err == f"error: --hf-checkpoint {tmp_path}: no config.json there (expected a HuggingFace model folder)"
    )
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "p.jsonl").write_text("{}")
    code, err = run_cli(
        [
            "--hf-checkpoint",
            str(tmp_path),
            "--prompt-data",
            str(tmp_path / "p.jsonl"),
            "--rm-type",
            "math",
            "--custom-generate-function-path",
            "no_such_module.generate",
        ],
        capsys,
    )
    assert code == 2 and err.startswith(
        "error: --custom-generate-function-path 'no_such_module.generate': cannot import module"
    )
    code, err = run_cli(
        [
            "--hf-checkpoint",
            str(tmp_path),
            "--prompt-data",
            str(tmp_path / "p.jsonl"),
            "--rm-type",
            "math",
            "--load",
            str(tmp_path),
        ],
        capsys,
    )
    assert code == 2 and err == f"error: --load {tmp_path}: no complete checkpoint (expected step_NNNNNNNN/meta.json)"


def test_user_errors_are_found_by_type_through_wrappers():
    from slime.errors import DataError, one_line, user_error_in

    class Wrapper(Exception):  # the shape of Ray's RayTaskError: the worker's exception as .cause
        def __init__(self, cause):
            super().__init__("wrapped")
            self.cause = cause

    inner = DataError("d.jsonl:3: invalid JSON\nmore lines", "d.jsonl", 3)
    assert user_error_in(Wrapper(Wrapper(inner))) is inner
    assert one_line(inner) == "d.jsonl:3: invalid JSON"
    assert user_error_in(Wrapper(ValueError("--x looks like a flag but is a bug"))) is None


# ---- the quickstart's recipe --------------------------------------------------------------------------
def test_quickstart_runs_async_and_in_bf16_where_native_unless_told(tmp_path):
    """The quickstart's defaults are its measured recipe (--async; --bf16 where the backend says bfloat16 is
    native); --sync and --fp32 take them back, and the flags still parse."""
    from slime.quickstart.run import native_bf16, parse_args, train_flags

    files = {name: tmp_path / f"{name}.jsonl" for name in ("train", "test", "sft", "val")}
    default = train_flags(parse_args([]), tmp_path, files, bf16=True)
    assert "--async" in default and "--bf16" in default
    config = parse_config(default)
    assert config.train.async_rollout and config.train.bf16
    plain = train_flags(parse_args(["--sync", "--fp32"]), tmp_path, files, bf16=False)
    assert "--async" not in plain and "--bf16" not in plain
    colocated = train_flags(parse_args(["--colocate"]), tmp_path, files, bf16=True)
    assert "--async" not in colocated and parse_config(colocated).cluster.colocate  # colocated steps take turns
    jax = parse_config(train_flags(parse_args(["--", "--train-backend", "jax"]), tmp_path, files))
    assert not native_bf16(jax)  # --bf16 is the Megatron trainer's: the JAX pair's nightly keeps float32
