"""The JAX rollout engine on tiny real HF checkpoints: greedy tokens equal transformers' generate, log-probs
equal the HF model's (softmax(logits / T), before truncation), a request's tokens do not depend on the batch,
weight updates change the outputs to the new model's, the compilation count stays bounded by the buckets, and
the SGLang-compatible server fronts it unchanged."""

import json
import urllib.request

import numpy as np
import pytest
import torch

pytest.importorskip("jax", reason="the JAX engine needs jax (pip install 'slime[test]')")

from tiny_models import build_model

from slime.rollout.engines.base import GenerateRequest, SamplingParams, WeightUpdateError
from slime.rollout.engines.jax.engine import JaxEngine
from slime.testing.ci_register import register_cpu_ci

register_cpu_ci(est_time=80, suite="base-b-test-cpu")

PROMPTS = [[5, 17, 33, 2, 9], [40, 41], [7] * 11, [100, 3, 250, 12, 8, 77, 61]]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("jax_engine")
    first = build_model("qwen3", str(root / "a"), seed=0)
    second = build_model("qwen3", str(root / "b"), seed=1)
    llama = build_model("llama", str(root / "llama"), seed=2, tie=True, vocab_size=251)
    return {"a": (root / "a", first), "b": (root / "b", second), "llama": (root / "llama", llama)}


@pytest.fixture(scope="module")
def engine(models):
    with JaxEngine(str(models["a"][0]), max_batch_size=8, max_seq_len=64, seed=0) as engine:
        yield engine


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    """transformers' argmax continuation, one full forward per token (EOS is a token like any other)."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt) :]


def greedy(prompt, n=10):
    return SamplingParams(temperature=0.0, max_new_tokens=n, ignore_eos=True)


def requests(prompts, params):
    return [GenerateRequest(f"r{i}", p, params if isinstance(params, SamplingParams) else params[i])
            for i, p in enumerate(prompts)]  # fmt: skip


def test_greedy_equals_transformers_generate_batched(engine, models):
    results = engine.generate(requests(PROMPTS, greedy(None)))
    model = models["a"][1]
    assert [r.output_ids for r in results] == [hf_greedy(model, p, 10) for p in PROMPTS]
    assert all(r.finish_reason == "length" for r in results)


def test_tied_llama_with_odd_vocab_equals_transformers(models):
    folder, model = models["llama"]
    with JaxEngine(str(folder), max_batch_size=4, max_seq_len=32) as engine:
        results = engine.generate(requests(PROMPTS[:2], greedy(None, 8)))
    assert [r.output_ids for r in results] == [hf_greedy(model, p, 8) for p in PROMPTS[:2]]


def test_logprobs_equal_hf_softmax_at_temperature_before_truncation(engine, models):
    params = SamplingParams(temperature=0.7, top_p=0.8, top_k=20, max_new_tokens=12, ignore_eos=True, seed=11)
    results = engine.generate(requests(PROMPTS, params))
    model = models["a"][1]
    for prompt, result in zip(PROMPTS, results):
        ids = torch.tensor([prompt + result.output_ids])
        with torch.no_grad():
            logits = model(ids).logits[0, len(prompt) - 1 : -1].double()
        expected = torch.log_softmax(logits / 0.7, dim=-1).gather(1, torch.tensor(result.output_ids)[:, None])[:, 0]
        np.testing.assert_allclose(result.output_log_probs, expected.numpy(), atol=2e-5)
        # top-k 20 truncation: every sampled token is among the 20 most likely under the model
        ranks = (logits > logits.gather(1, torch.tensor(result.output_ids)[:, None])).sum(dim=1)
        assert int(ranks.max()) < 20


def test_a_seeded_request_samples_the_same_tokens_alone_or_batched(engine):
    params = [SamplingParams(temperature=1.0, max_new_tokens=16, ignore_eos=True, seed=100 + i) for i in range(4)]
    batched = engine.generate(requests(PROMPTS, params))
    alone = [engine.generate(requests([p], [params[i]]))[0] for i, p in enumerate(PROMPTS)]
    assert [r.output_ids for r in batched] == [r.output_ids for r in alone]
    assert len({tuple(r.output_ids) for r in batched}) == 4  # it does sample
    other_seed = SamplingParams(temperature=1.0, max_new_tokens=16, ignore_eos=True, seed=7)
    assert engine.generate(requests(PROMPTS[:1], other_seed))[0].output_ids != batched[0].output_ids


def test_stop_tokens_and_lengths(engine, models):
    expected = hf_greedy(models["a"][1], PROMPTS[0], 10)
    stop_at = expected[4]
    params = SamplingParams(temperature=0.0, max_new_tokens=10, stop_token_ids=(stop_at,), ignore_eos=True)
    result = engine.generate(requests(PROMPTS[:1], params))[0]
    cut = expected.index(stop_at) + 1
    assert result.output_ids == expected[:cut] and result.finish_reason == "stop" and result.matched_stop == stop_at
    too_long = engine.generate(requests([[1] * 64], greedy(None)))[0]
    assert too_long.finish_reason == "error" and "longer than the engine's context" in too_long.error
    near_end = engine.generate(requests([[3] * 60], greedy(None)))[0]
    assert near_end.finish_reason == "length" and len(near_end.output_ids) == 4  # the context ends at 64


def test_weight_update_serves_the_new_model_and_a_bad_one_is_rejected_whole(models):
    folder_b, model_b = models["b"]
    with JaxEngine(str(models["a"][0]), max_batch_size=4, max_seq_len=32) as engine:
        named = list(model_b.state_dict().items())
        half = len(named) // 2
        engine.begin_weight_update()
        engine.update_weights_from_tensors(named[:half], version=3, finish=False)
        engine.update_weights_from_tensors(named[half:], version=3, finish=True)
        engine.end_weight_update()
        assert engine.weight_version == 3
        result = engine.generate(requests(PROMPTS[:2], greedy(None, 8)))
        assert [r.output_ids for r in result] == [hf_greedy(model_b, p, 8) for p in PROMPTS[:2]]
        assert {r.weight_version for r in result} == {3}
        bad = [("model.norm.weight", torch.ones(3))]
        with pytest.raises(WeightUpdateError, match="model.norm.weight.*shape"):
            engine.update_weights_from_tensors(named[:half] + bad, version=4)
        engine.update_weights_from_disk(str(models["a"][0]), version=5)
        again = engine.generate(requests(PROMPTS[:1], greedy(None, 8)))[0]
        assert again.output_ids == hf_greedy(models["a"][1], PROMPTS[0], 8) and again.weight_version == 5


def test_compilations_stay_bounded_by_the_buckets(models):
    with JaxEngine(str(models["a"][0]), max_batch_size=8, max_seq_len=64) as engine:
        short = [p[:5] for p in PROMPTS]  # prompts in the 8-token bucket, contexts in the 8 and 16 buckets
        engine.generate(requests(short, greedy(None, 6)))
        warm = engine.traces
        assert warm == {"prefill": 1, "decode": 2}
        for n in (1, 2, 3):  # other batch sizes and prompt lengths inside the same buckets
            engine.generate(requests([p[: 2 + n] for p in PROMPTS[:n]], greedy(None, 4 + n)))
        assert engine.traces == warm
        # a sampling batch with truncation adds the filtered variant once, not once per call
        topk = SamplingParams(temperature=1.0, top_k=5, max_new_tokens=6, ignore_eos=True, seed=1)
        engine.generate(requests(PROMPTS, topk))
        after_filter = engine.traces
        engine.generate(requests(PROMPTS[:3], topk))
        assert engine.traces == after_filter
        # every program is one (rows bucket, length bucket, filtered) combination: at most 2 * 2 * 4 per kind here
        assert all(count <= 16 for count in engine.traces.values())


def test_the_http_server_fronts_the_jax_engine(engine, models):
    from slime.rollout.engines.embedded.server import serve_http

    handle = serve_http(engine)
    try:
        body = {"input_ids": PROMPTS[:2], "sampling_params": {"temperature": 0, "max_new_tokens": 6,
                                                              "ignore_eos": True}, "return_logprob": True}  # fmt: skip
        request = urllib.request.Request(
            handle.url + "/generate", json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=120) as response:
            outputs = json.loads(response.read())
        assert [o["output_ids"] for o in outputs] == [hf_greedy(models["a"][1], p, 6) for p in PROMPTS[:2]]
        assert all(len(o["meta_info"]["output_token_logprobs"]) == 6 for o in outputs)
        with urllib.request.urlopen(handle.url + "/get_server_info", timeout=30) as response:
            assert json.loads(response.read())["engine"] == "slime-jax"
    finally:
        handle.stop()


def test_stop_strings_end_at_the_first_match(tmp_path):
    from slime.rollout.engines.embedded.engine import CheckpointTokenizer

    build_model("qwen3", str(tmp_path), seed=4, vocab_size=256, with_tokenizer=True)
    tokenizer = CheckpointTokenizer(str(tmp_path / "tokenizer.json"))
    prompt = tokenizer.encode("the quick brown")
    with JaxEngine(str(tmp_path), max_batch_size=2, max_seq_len=48) as engine:
        free = engine.generate(requests([prompt], greedy(None, 12)))[0]
        text = tokenizer.decode(free.output_ids)
        stop = text[len(text) // 2 :][:2]
        assert stop.strip(), text  # a printable piece of the free-running output
        cut = next(k for k in range(1, 13) if stop in tokenizer.decode(free.output_ids[:k]))
        params = SamplingParams(temperature=0.0, max_new_tokens=12, ignore_eos=True, stop=(stop,))
        stopped = engine.generate(requests([prompt], params))[0]
    assert stopped.output_ids == free.output_ids[:cut]
    assert stopped.finish_reason == "stop" and stopped.matched_stop == stop
