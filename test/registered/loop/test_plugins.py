"""Plugin contracts on CPU, through the real rollout code and a real embedded engine behind its HTTP server:
the default (batched) generate equals one request per sample, a failing engine attempt is rolled back and
retried exactly once, partial rollouts come back and continue, and each plugin kind resolves by dotted path
with its flag named on a bad path or signature."""

import asyncio

import pytest
import torch

from slime.config import parse_config
from slime.testing.ci_register import register_cpu_ci
from slime.types import Sample, SampleStatus

register_cpu_ci(est_time=15, suite="base-b-test-cpu")

from loop_helpers import build_task  # noqa: E402


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from transformers import AutoTokenizer

    from slime.rollout.engines.embedded.engine import EmbeddedEngine
    from slime.rollout.engines.embedded.server import serve_http

    torch.set_num_threads(1)
    files = build_task(tmp_path_factory.mktemp("task"))
    engine = EmbeddedEngine(str(files["model"]), max_batch_size=32, max_seq_len=256, seed=0)
    server = serve_http(engine)
    yield files, server.url, AutoTokenizer.from_pretrained(str(files["model"])), engine
    server.stop()
    engine.shutdown()


def config_for(files, *extra):
    return parse_config(
        [
            "--hf-checkpoint",
            str(files["model"]),
            "--prompt-data",
            str(files["train"]),
            "--rm-type",
            "arithmetic",
            "--rollout-max-response-len",
            "4",
            "--rollout-batch-size",
            "2",
            "--n-samples-per-prompt",
            "4",
            "--global-batch-size",
            "8",
            *extra,
        ]
    )


def source(files, tokenizer, n=4):
    from slime.rollout.data import load_data_source

    return load_data_source(
        str(files["train"]),
        tokenizer,
        input_key="prompt",
        label_key="label",
        metadata_key=None,
        apply_chat_template=False,
        max_prompt_len=None,
        n_samples_per_prompt=n,
        shuffle=False,
        seed=0,
        skip_bad_rows=False,
    )


def run(coro):
    return asyncio.new_event_loop().run_until_complete(coro)


def test_batched_group_generation_equals_one_request_per_sample(served):
    from slime.rollout import generate
    from slime.rollout.generate import RolloutContext
    from slime.rollout.rollout import RolloutStats, generate_one, generate_samples

    files, url, tokenizer, _ = served
    config = config_for(files)
    params = generate.sampling_params_for(config)

    async def both():
        ctx = RolloutContext(config, tokenizer, [url])
        group_a, group_b = source(files, tokenizer).get_groups(1)[0], source(files, tokenizer).get_groups(1)[0]
        await generate_samples(ctx, generate.generate, group_a, params, RolloutStats())

        async def one_by_one(ctx, sample, p):  # a custom function: runs per sample, not batched
            return await generate.generate(ctx, sample, p)

        await asyncio.gather(*(generate_one(ctx, one_by_one, s, params, RolloutStats()) for s in group_b))
        await ctx.close()
        return group_a, group_b

    group_a, group_b = run(both())
    assert [s.tokens for s in group_a] == [s.tokens for s in group_b]  # seeded per sample: batching changes nothing
    for a, b in zip(group_a, group_b):  # other rows in the batch change matmul rounding, not the sampled tokens
        torch.testing.assert_close(
            torch.tensor(a.rollout_log_probs), torch.tensor(b.rollout_log_probs), atol=1e-5, rtol=0
        )
    assert len({tuple(s.tokens) for s in group_a}) > 1  # and the samples of a group differ from each other


def test_an_engine_failure_mid_sample_is_rolled_back_and_retried_once(served):
    from slime.rollout import generate
    from slime.rollout.engines.base import EngineUnavailable
    from slime.rollout.generate import RolloutContext
    from slime.rollout.rollout import RolloutStats, generate_one

    files, url, tokenizer, _ = served
    config = config_for(files)
    calls = []

    async def flaky(ctx, sample, params):
        calls.append(sample.response_length)
        await generate.generate(ctx, sample, params)
        if len(calls) == 1:
            raise EngineUnavailable("the engine went away after answering")  # output already appended
        return sample

    async def go():
        ctx = RolloutContext(config, tokenizer, [url])
        sample = source(files, tokenizer, n=1).get_groups(1)[0][0]
        prompt = list(sample.tokens)
        recovered = []

        async def recover():
            recovered.append(True)

        stats = RolloutStats()
        await generate_one(ctx, flaky, sample, generate.sampling_params_for(config), stats, recover)
        await ctx.close()
        return sample, prompt, stats, recovered

    sample, prompt, stats, recovered = run(go())
    assert calls == [0, 0]  # the retry started from the prompt again
    assert sample.tokens[: len(prompt)] == prompt and len(sample.tokens) == len(prompt) + sample.response_length
    assert len(sample.loss_mask) == len(sample.rollout_log_probs) == sample.response_length
    assert stats.engine_retries == 1 and recovered == [True]


def test_partial_rollout_returns_aborted_groups_with_their_tokens(served):
    from slime import plugins
    from slime.rollout import generate
    from slime.rollout.generate import RolloutContext
    from slime.rollout.rollout import generate_rollout

    files, url, tokenizer, engine = served
    config = config_for(
        files,
        "--partial-rollout",
        "--over-sampling-batch-size",
        "6",
        "--rollout-max-response-len",
        "200",
        "--custom-rm-path",
        "loop_plugins.parity_reward",
    )
    data = source(files, tokenizer)
    loaded = plugins.load_rollout_plugins(config)

    async def two_fast_groups(ctx, sample, params):
        # groups 0-1 answer in one token; the others run 200 tokens, so they are mid-generation at the abort
        budget = dict(params, max_new_tokens=1) if sample.group_index < 2 else dict(params, ignore_eos=True)
        return await generate.generate(ctx, sample, budget)

    async def go():
        ctx = RolloutContext(config, tokenizer, [url])
        first = await generate_rollout(
            ctx,
            data,
            num_groups=2,
            generate_fn=two_fast_groups,
            reward=loaded.reward,
            over_sampling_groups=6,
            partial_rollout=True,
        )
        returned = [[(s.status, s.response_length) for s in g] for g in data.buffer]
        returned_ids = [g[0].group_index for g in data.buffer]
        second = await generate_rollout(ctx, data, num_groups=2, generate_fn=loaded.generate_fn, reward=loaded.reward)
        await ctx.close()
        return first, returned, returned_ids, second

    first, returned, returned_ids, second = run(go())
    assert sorted(g[0].group_index for g in first.groups) == [0, 1]
    assert first.metrics["rollout/groups_returned_partial"] == len(returned) == 4 and returned_ids == [2, 3, 4, 5]
    for group in returned:  # cut off mid-way, kept as far as they got, marked to continue
        assert all(status is SampleStatus.PENDING and 1 <= n < 200 for status, n in group)
    assert sorted(g[0].group_index for g in second.groups) == [2, 3]  # the buffer is served before new prompts
    for group, before in zip(second.groups, returned):
        for s, (_, partial) in zip(group, before):
            assert s.status in (SampleStatus.COMPLETED, SampleStatus.TRUNCATED) and s.reward is not None
            assert partial <= s.response_length <= 200 and len(s.tokens) == s.prompt_length + s.response_length


def test_each_plugin_kind_resolves_and_bad_paths_name_their_flag(served):
    from slime import plugins
    from slime.plugins import PluginError
    from slime.rollout.filters import check_reward_nonzero_std

    files = served[0]
    loaded = plugins.load_rollout_plugins(
        config_for(
            files,
            "--custom-generate-function-path",
            "loop_plugins.two_turn_generate",
            "--custom-rm-path",
            "loop_plugins.parity_reward",
            "--dynamic-sampling-filter-path",
            "slime.rollout.filters.check_reward_nonzero_std",
            "--rollout-function-path",
            "test_plugins.rollout_contract",
        )
    )
    assert loaded.filter_fn is check_reward_nonzero_std and loaded.rollout_fn is rollout_contract
    assert loaded.reward.custom_rm.__name__ == "parity_reward"
    for flag, path, message in [
        ("--custom-rm-path", "loop_plugins.nothing_here", "has no attribute 'nothing_here'"),
        ("--dynamic-sampling-filter-path", "loop_plugins.two_turn_generate", "takes 3 required arguments, expected 2"),
        ("--rollout-function-path", "nodots", "expected a dotted path"),
    ]:
        with pytest.raises(PluginError, match=f"{flag} .*{message}"):
            plugins.load_rollout_plugins(config_for(files, flag, path))


async def rollout_contract(ctx, data_source, rollout_id):
    """--rollout-function-path contract: return a RolloutResult of whole groups."""
    from slime.rollout.rollout import RolloutResult

    return RolloutResult(data_source.get_groups(ctx.config.rollout.rollout_batch_size))


def test_custom_advantage_function_contract():
    """Loaded the way the loop loads it and run through the loop's advantage step, which checks its output."""
    from slime.loop_steps import fill_advantages
    from slime.plugins import PluginError, load_function
    from slime.training.batch import TrainBatch
    from slime.training.experience import AdvantageSettings

    samples = [
        Sample(tokens=[1, 2, 3], response_length=1, reward=1.0, index=0),
        Sample(tokens=[1, 2, 3, 4], response_length=2, reward=0.0, index=1),
    ]
    flag = "--custom-advantage-function-path"
    batch = TrainBatch.from_samples(samples, 0)
    fill_advantages(AdvantageSettings(), batch, [0, 0], load_function("loop_plugins.constant_advantage", flag, 3))
    assert [a.tolist() for a in batch.advantages] == [[0.5], [0.5, 0.5]]
    assert [r.tolist() for r in batch.returns] == [[0.5], [0.5, 0.5]]

    builtin = TrainBatch.from_samples(samples, 0)
    builtin.rewards = [1.0, 0.0]
    fill_advantages(AdvantageSettings(), builtin, [0, 0])  # GRPO: +-1/std over a group of two, per token
    assert builtin.advantages[0].tolist() == pytest.approx([0.7071], abs=1e-3)

    broken = TrainBatch.from_samples(samples, 0)
    with pytest.raises(
        PluginError, match=r"one_value_per_sample_advantage: batch.advantages\[1\] must have shape \(2,\), got \(1,\)"
    ):
        fill_advantages(
            AdvantageSettings(), broken, [0, 0], load_function("loop_plugins.one_value_per_sample_advantage", flag, 3)
        )


def test_group_reward_with_the_wrong_count_is_a_clear_error():
    from slime.rollout import rm_hub

    with pytest.raises(ValueError, match="group reward returned 1 rewards for 2 samples"):
        run(rm_hub.score_samples([Sample(), Sample()], rm_type=None, custom_rm=lambda ctx, group: [1.0], group_rm=True))
