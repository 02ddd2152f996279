"""A user's plugin that fails at run time is named, and no reward that is not a finite number gets further than
the reward step: through the real rollout code (a custom generate function stands in for the engine), the
advantage step and the train step with a recording trainer. `--reward-errors zero | skip` count what they absorb.
"""

import asyncio
import pickle
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from slime.config import parse_config
from slime.plugin_failures import PluginFailure, naming_rollout, plugin_failure_in
from slime.rollout.reward_checks import REWARD_ERROR, checked_reward
from slime.testing.ci_register import register_cpu_ci
from slime.types import Sample, SampleStatus

register_cpu_ci(est_time=12, suite="base-b-test-cpu")

from loop_helpers import build_task  # noqa: E402

HINT = "--reward-errors zero or skip scores such a sample 0 or drops its group instead"


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    from transformers import AutoTokenizer

    files = build_task(tmp_path_factory.mktemp("task"))
    return files, AutoTokenizer.from_pretrained(str(files["model"]))


def config_for(files, *extra):
    base = ["--hf-checkpoint", str(files["model"]), "--prompt-data", str(files["train"])]
    sizes = ["--rollout-batch-size", "2", "--n-samples-per-prompt", "4", "--global-batch-size", "8"]
    return parse_config([*base, *sizes, "--custom-rm-path", "loop_plugins.parity_reward", *extra])


def data_source(files, tokenizer):
    from slime.rollout.data import load_data_source

    return load_data_source(
        str(files["train"]), tokenizer, input_key="prompt", label_key="label", metadata_key=None,
        apply_chat_template=False, max_prompt_len=None, n_samples_per_prompt=4, shuffle=False, seed=0,
        skip_bad_rows=False,
    )  # fmt: skip


async def answer_12(ctx, sample, params):
    """Stands in for an engine: every response is the two tokens of "12"."""
    sample.append_response(ctx.tokenizer("12", add_special_tokens=False)["input_ids"], None, trainable=True)
    sample.response, sample.status = "12", SampleStatus.COMPLETED
    return sample


def rollout(files, tokenizer, *extra, generate_fn=answer_12, filter_fn=None, num_groups=2):
    from slime import plugins
    from slime.rollout.generate import RolloutContext
    from slime.rollout.rollout import generate_rollout

    config = config_for(files, *extra)
    loaded = plugins.load_rollout_plugins(config)
    ctx = RolloutContext(config, tokenizer, [])
    data = data_source(files, tokenizer)
    run = generate_rollout(
        ctx, data, num_groups=num_groups, generate_fn=generate_fn, reward=loaded.reward, filter_fn=filter_fn
    )
    return asyncio.new_event_loop().run_until_complete(run)


def failure_of(files, tokenizer, *extra, num_groups=1, **kwargs) -> PluginFailure:
    """The failure of a rollout of `num_groups` groups (groups are scored as they finish: with several, which
    failure comes first is up to the event loop)."""
    with pytest.raises(PluginFailure) as info:
        rollout(files, tokenizer, *extra, num_groups=num_groups, **kwargs)
    return info.value


def test_a_raising_reward_is_named_with_its_sample_and_keeps_its_traceback(task):
    files, tokenizer = task
    failure = failure_of(files, tokenizer, "--custom-rm-path", "loop_plugins.failing_reward", num_groups=2)
    prompt = data_source(files, tokenizer).get_groups(2)[1][0].prompt
    assert failure.line() == (
        f"--custom-rm-path loop_plugins.failing_reward raised ValueError: reward service returned 503 "
        f"(sample 5 of group 1, prompt {prompt!r}); {HINT}"
    )
    assert failure.user_traceback.startswith("Traceback (most recent call last):")
    assert 'raise ValueError("reward service returned 503")' in failure.user_traceback
    assert "reward_checks.py" not in failure.user_traceback  # from the plugin's own frame on
    with pytest.raises(PluginFailure) as info, naming_rollout("rollout 7"):
        raise failure
    assert info.value.line().endswith(f"prompt {prompt!r}, rollout 7); {HINT}")


@pytest.mark.parametrize(
    "value, problem",
    [
        (float("nan"), "returned nan, not a finite number"),
        (float("-inf"), "returned -inf, not a finite number"),
        (None, "returned None (NoneType), not a number"),
        ("1.0 points", "returned '1.0 points' (str), not a number"),
        (torch.tensor([0.5, 1.0]), "returned a tensor of shape (2,), not one number"),
        (torch.tensor([[1.0]]), "returned a tensor of shape (1, 1), not one number"),
        (torch.tensor(float("nan")), "returned nan, not a finite number"),
        ({"acc": 1.0}, "returned a dict (keys ['acc']); name the one to train on with --reward-key"),
    ],
)
def test_a_reward_that_is_not_one_finite_number_is_refused(value, problem):
    assert checked_reward(value, None) == (None, problem)


@pytest.mark.parametrize(
    "value, kept",
    [(1, 1.0), (True, 1.0), (np.float32(0.25), 0.25), (torch.tensor(0.5), 0.5), (torch.tensor([2.0]), 2.0)],
)
def test_one_finite_number_in_any_form_is_kept_as_a_float(value, kept):
    reward, problem = checked_reward(value, None)
    assert problem is None and reward == kept and type(reward) is float
    assert checked_reward({"acc": value, "other": "x"}, "acc") == ({"acc": kept, "other": "x"}, None)


def test_nan_is_refused_naming_the_reward_unless_zeroed(task):
    files, tokenizer = task
    failure = failure_of(files, tokenizer, "--custom-rm-path", "loop_plugins.nan_or_failing_reward")
    assert failure.line().startswith(
        "--custom-rm-path loop_plugins.nan_or_failing_reward returned nan, not a finite number (sample 0 of group 0,"
    )
    assert failure.user_traceback == ""  # nothing raised: the value is the problem

    result = rollout(
        files, tokenizer, "--custom-rm-path", "loop_plugins.nan_or_failing_reward", "--reward-errors", "zero"
    )
    samples = result.samples
    bad = [s.index for s in samples if s.index % 5 == 0 or s.index % 7 == 3]
    assert [s.index for s in samples] == list(range(8)) and bad == [0, 3, 5]
    assert [s.reward for s in samples] == [0.0 if s.index in bad else 1.0 for s in samples]  # "12": even length
    assert [s.index for s in samples if REWARD_ERROR in s.metadata] == bad
    assert (
        samples[3]
        .metadata[REWARD_ERROR]
        .startswith(
            "--custom-rm-path loop_plugins.nan_or_failing_reward raised ConnectionError: reward service timed out (sample 3"
        )
    )
    assert result.metrics["rollout/reward_errors_zeroed"] == 3.0
    assert result.metrics["rollout/reward_errors_skipped_groups"] == 0.0


def test_skip_drops_the_failing_groups_and_draws_others(task):
    files, tokenizer = task
    extra = ("--custom-rm-path", "loop_plugins.failing_odd_groups_reward", "--reward-errors", "skip")
    result = rollout(files, tokenizer, *extra, num_groups=3)
    assert [g[0].group_index for g in result.groups] == [0, 2, 4]  # groups 1 and 3 dropped, 4 drawn instead
    assert all(s.reward == 1.0 and REWARD_ERROR not in s.metadata for s in result.samples)
    assert result.metrics["rollout/reward_errors_skipped_groups"] == 2.0
    assert result.metrics["rollout/reward_errors_zeroed"] == 0.0


def test_group_reward_failures_name_the_group(task):
    files, tokenizer = task
    failure = failure_of(files, tokenizer, "--custom-rm-path", "loop_plugins.group_rank_reward")  # not --group-rm
    assert "raised TypeError: 'Sample' object is not iterable (sample 0 of group 0, prompt" in failure.line()
    failure = failure_of(files, tokenizer, "--custom-rm-path", "test_plugin_failures.one_reward", "--group-rm")
    assert failure.line().startswith(
        "--custom-rm-path test_plugin_failures.one_reward returned 1 rewards for 4 samples (--group-rm: a list, one "
        "per sample) (group 0 (samples 0-3), prompt"
    )


def one_reward(ctx, samples):
    return [1.0]


def test_generate_and_filter_plugins_are_named(task):
    files, tokenizer = task

    async def broken_generate(ctx, sample, params):
        raise KeyError("tool_output")

    def broken_filter(ctx, group):
        return group[0].metadata["difficulty"] > 1

    failure = failure_of(files, tokenizer, generate_fn=broken_generate)
    assert failure.line().startswith(
        "--custom-generate-function-path test_plugin_failures.test_generate_and_filter_plugins_are_named.<locals>."
        "broken_generate raised KeyError: 'tool_output' (sample 0 of group 0, prompt"
    )
    failure = failure_of(files, tokenizer, filter_fn=broken_filter)
    assert "--dynamic-sampling-filter-path" in failure.line() and "broken_filter raised KeyError: 'difficulty'" in (
        failure.line()
    )
    assert "(group 0 (samples 0-3), prompt" in failure.line()


def test_the_failure_crosses_ray_and_the_cli_prints_traceback_then_the_line(capsys):
    from ray.exceptions import RayTaskError

    from slime.train_cli import _exit_code

    original = PluginFailure("--custom-rm-path m.f", "raised ValueError: x", "sample 1 of group 0, prompt '1+1='")
    original = original.in_rollout("rollout 2")
    original.user_traceback = 'Traceback (most recent call last):\n  File "m.py", line 3, in f\nValueError: x\n'
    copy = pickle.loads(pickle.dumps(original))
    assert (copy.line(), copy.user_traceback) == (original.line(), original.user_traceback)
    wrapped = RayTaskError("RolloutManager.generate", "Traceback ...", copy).as_instanceof_cause()
    assert plugin_failure_in(wrapped).line() == original.line()
    assert _exit_code(wrapped) == 1
    err = capsys.readouterr().err
    assert err == original.user_traceback + (
        "error: --custom-rm-path m.f raised ValueError: x (sample 1 of group 0, prompt '1+1=', rollout 2)\n"
    )


class RecordingTrainer:
    """Stands in for the trainer group: records every batch handed to an optimizer step."""

    keeps_step_log_probs = True

    def __init__(self):
        self.batches = []

    def submit_train(self, batch, keep, generating=None):
        self.batches.append(batch)
        return []

    def finish_train(self, futures, total):
        return {"loss": 0.0}, None, None


def train_step(config, samples, advantage_fn=None):
    from slime.loop_steps import train_on_rollout

    run = SimpleNamespace(actor=RecordingTrainer(), critic=None)
    try:
        train_on_rollout(config, run, samples, 0, 3, False, 16, advantage_fn)
    except PluginFailure:
        pass
    return run.actor.batches


def scored(rewards):
    return [
        Sample(prompt="1+1=", tokens=[1, 2, 3, 4], response_length=2, reward=r, index=i, group_index=i // 4,
               loss_mask=[1, 1], rollout_log_probs=[-0.5, -0.5])
        for i, r in enumerate(rewards)
    ]  # fmt: skip


def test_the_optimizer_never_sees_a_reward_that_is_not_finite(task):
    files, _ = task
    config = config_for(files, "--rollout-function-path", "test_plugins.rollout_contract")
    seen = train_step(config, scored([1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0, 1.0]))
    assert len(seen) == 1 and all(bool(torch.isfinite(a).all()) for a in seen[0].advantages)
    for bad in (float("nan"), float("inf"), None, "1.0"):
        with pytest.raises(PluginFailure) as info:
            from slime.loop_steps import train_on_rollout

            train_on_rollout(config, SimpleNamespace(actor=RecordingTrainer(), critic=None),
                             scored([1.0, 0.0, 1.0, bad, 0.0, 0.0, 1.0, 1.0]), 0, 3, False, 16)  # fmt: skip
        assert info.value.line() == (
            f"--rollout-function-path test_plugins.rollout_contract set a sample's reward to {bad!r}, not one finite "
            "number (sample 3 of group 0, prompt '1+1=', rollout 3)"
        )
        assert train_step(config, scored([1.0, 0.0, 1.0, bad, 0.0, 0.0, 1.0, 1.0])) == []  # no step was taken


def nan_advantage(settings, batch, group_ids):
    batch.advantages = [torch.full((n,), float("nan")) for n in batch.response_lengths]
    batch.returns = [a.clone() for a in batch.advantages]


def raising_advantage(settings, batch, group_ids):
    raise ZeroDivisionError("group of one")


def test_an_advantage_plugin_that_fails_or_returns_nan_is_named_and_no_step_is_taken(task):
    files, _ = task
    config = config_for(files)
    samples = scored([1.0, 0.0] * 4)
    for fn, problem in [
        (nan_advantage, "set batch.advantages[0] to [nan, nan]: not all finite"),
        (raising_advantage, "raised ZeroDivisionError: group of one"),
    ]:
        with pytest.raises(PluginFailure) as info:
            from slime.loop_steps import train_on_rollout

            train_on_rollout(
                config, SimpleNamespace(actor=RecordingTrainer(), critic=None), samples, 0, 3, False, 16, fn
            )
        name = f"--custom-advantage-function-path test_plugin_failures.{fn.__name__}"
        assert info.value.line() == f"{name} {problem} (rollout 3)"
        assert train_step(config, samples, fn) == []
