"""Config: flags generate from the typed sections, cross-checks fail with the formula and numbers, frozen."""

import dataclasses
import json

import pytest

from slime.config import ConfigError, parse_config
from slime.testing.ci_register import register_cpu_ci

register_cpu_ci(est_time=8, suite="base-a-test-cpu")

BASE = ["--hf-checkpoint", "m", "--prompt-data", "p.jsonl", "--rm-type", "math"]


def parse(extra: str):
    return parse_config(BASE + extra.split())


def test_sections_and_passthrough():
    c = parse(
        "--rollout-batch-size 4 --n-samples-per-prompt 8 --global-batch-size 16 --async --partial-rollout "
        "--eps-clip-high 0.28 --use-kl-loss --kl-loss-coef 0.01 --sglang-mem-fraction-static 0.7 "
        "--hidden-dropout 0.0 --rollout-stop a b --eval-prompt-data aime a.jsonl gsm g.jsonl"
    )
    assert (c.rollout.rollout_batch_size, c.train.async_rollout, c.rollout.partial_rollout) == (4, True, True)
    assert c.algorithm.eps_clip_high == 0.28 and c.algorithm.kl_loss_coef == 0.01
    assert c.sglang == {"mem_fraction_static": "0.7"}
    assert c.megatron == {"hidden_dropout": 0.0}
    assert c.rollout.rollout_stop == ["a", "b"]
    assert c.train_steps_per_rollout == 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.train.lr = 1.0


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            "--rollout-batch-size 3 --n-samples-per-prompt 5 --global-batch-size 4",
            "--rollout-batch-size * --n-samples-per-prompt = 3 * 5 = 15 must be divisible by --global-batch-size 4",
        ),
        (
            "--actor-num-gpus-per-node 3 --tensor-model-parallel-size 2",
            "--actor-num-nodes * --actor-num-gpus-per-node = 3 must be divisible by --tensor-model-parallel-size 2",
        ),
        (
            "--actor-num-gpus-per-node 2 --global-batch-size 8 --micro-batch-size 3 --rollout-batch-size 8",
            "--global-batch-size / dp = 8 / 2 = 4 must be divisible by --micro-batch-size 3",
        ),
        ("--rollout-batch-sise 3", "unknown flag --rollout-batch-sise; did you mean --rollout-batch-size?"),
        ("--hiden-dropout 0.1", "unknown flag --hiden-dropout; did you mean --hidden-dropout?"),
        ("--hidden-dropout abc", "--hidden-dropout expects float, got 'abc'"),
        ("--advantage-estimator dpo", "argument --advantage-estimator: invalid choice: 'dpo'"),
        ("--n-samples-per-prompt 1 --global-batch-size 8", "needs --n-samples-per-prompt >= 2"),
        ("--use-kl-loss", "--use-kl-loss needs --kl-loss-coef > 0"),
        ("--eval-prompt-data aime", "--eval-prompt-data takes NAME PATH pairs"),
        ("--use-dynamic-batch-size", "--use-dynamic-batch-size needs --max-tokens-per-gpu"),
        (
            "--async --colocate",
            "--async overlaps generation with training on separate devices; --colocate shares them: use one",
        ),
        (
            "--kl-coef 0.1",
            "--kl-coef (KL as reward shaping) needs --advantage-estimator ppo or reinforce_plus_plus; with grpo use --use-kl-loss",
        ),
        ("--eval-interval 5", "--eval-interval needs --eval-prompt-data NAME PATH"),
        ("--sft-warmup-steps 3 --sft-data s.jsonl --sft-batch-size 0", "--sft-batch-size must be >= 1, got 0"),
        ("--sft-stop-reward 0.3", "--sft-stop-reward and --sft-eval-set go together"),
        (
            "--sft-stop-reward 0.3 --sft-eval-set val --eval-prompt-data test t.jsonl",
            "--sft-eval-set 'val' is not a NAME given to --eval-prompt-data",
        ),
    ],
)
def test_validation_messages(extra, message):
    with pytest.raises(ConfigError) as info:
        parse(extra)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_required_inputs():
    with pytest.raises(ConfigError, match="no reward: give --rm-type or --custom-rm-path"):
        parse_config(["--hf-checkpoint", "m", "--prompt-data", "p"])
    with pytest.raises(ConfigError, match="--hf-checkpoint is required"):
        parse_config(["--prompt-data", "p", "--rm-type", "math"])


def test_written_config_round_trips(tmp_path):
    c = parse("--lr 3e-4 --num-rollout 7")
    path = c.write(tmp_path / "run")
    data = json.loads(path.read_text())
    assert data["train"]["lr"] == 3e-4 and data["train"]["num_rollout"] == 7 and data["rollout"]["rm_type"] == "math"
