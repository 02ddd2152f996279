"""Pure functions of the engines: sampling math, SGLang JSON both ways, tensor serialization, server argv."""

import argparse
import math

import pytest
import torch

from slime.rollout.engines.base import GenerateRequest, GenerateResult, SamplingParams
from slime.rollout.engines.batching import find_stop_string
from slime.rollout.engines.embedded.sampling import (
    BatchSampling,
    filtered_log_probs,
    inverse_cdf_sample,
    sample_tokens,
)
from slime.rollout.engines.protocol import (
    ProtocolError,
    deserialize_named_tensors,
    generate_response_json,
    parse_generate_request,
    parse_generate_response,
    parse_sampling_params,
    sampling_params_to_json,
    serialize_named_tensors,
)
from slime.rollout.engines.sglang.launcher import server_argv
from slime.testing.ci_register import register_cpu_ci

register_cpu_ci(est_time=8, suite="base-a-test-cpu")


def batch(n, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, greedy=False):
    full = lambda v, dtype=torch.float32: torch.full((n,), v, dtype=dtype)  # noqa: E731
    return BatchSampling(
        temperature=full(temperature),
        top_k=full(top_k, torch.long),
        top_p=full(top_p),
        min_p=full(min_p),
        greedy=full(greedy, torch.bool),
        all_greedy=greedy,
        any_greedy=greedy,
        unit_temperature=temperature in (0.0, 1.0),
        any_filter=top_k > 0 or top_p < 1 or min_p > 0,
    )


# ---- sampling --------------------------------------------------------------------------------------------
def test_inverse_cdf_closed_form_and_zero_weight_never_drawn():
    weights = torch.tensor([[1.0, 0.0, 3.0]]).repeat(5, 1)
    uniform = torch.tensor([0.0, 0.24, 0.2500001, 0.26, 0.99999999])
    # cumulative [1, 1, 4]; target = u * 4: 0 -> 0, 0.96 -> 0, ~1.0 -> 2 (index 1 has no weight), 1.04 -> 2, ~4 -> 2
    assert inverse_cdf_sample(weights, uniform).tolist() == [0, 0, 2, 2, 2]


def test_filters_match_closed_form():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    log_probs = probs.log()
    kept = lambda params: torch.isfinite(filtered_log_probs(log_probs, params))[0].tolist()  # noqa: E731
    assert kept(batch(1, top_k=2)) == [True, True, False, False]
    # top-p 0.5: mass before each token is [0, .5, .8, .95]; drop where it exceeds 0.5
    assert kept(batch(1, top_p=0.5)) == [True, True, False, False]
    assert kept(batch(1, top_p=0.81)) == [True, True, True, False]
    # min-p 0.5: keep p >= 0.25
    assert kept(batch(1, min_p=0.5)) == [True, True, False, False]
    # the most likely token always survives
    assert kept(batch(1, top_p=1e-9)) == [True, False, False, False]


def test_logprobs_are_after_temperature_before_truncation():
    torch.manual_seed(0)
    logits = torch.randn(6, 50)
    params = batch(6, temperature=0.7, top_k=3, top_p=0.9)
    tokens, log_probs = sample_tokens(logits, params, torch.rand(6))
    expected = torch.log_softmax(logits / 0.7, dim=-1).gather(1, tokens.view(-1, 1)).view(-1)
    assert torch.allclose(log_probs, expected, atol=1e-6)
    top3 = logits.topk(3, dim=-1).indices
    assert all(t in row for t, row in zip(tokens.tolist(), top3.tolist()))


def test_greedy_rows_take_argmax_with_temperature_one_logprobs():
    logits = torch.randn(4, 30)
    params = batch(4, temperature=0.0, greedy=True)
    tokens, log_probs = sample_tokens(logits, params, None)
    assert tokens.tolist() == logits.argmax(-1).tolist()
    assert torch.allclose(log_probs, torch.log_softmax(logits, -1).max(-1).values)


def test_sampling_frequencies_follow_the_distribution():
    probs = torch.tensor([0.1, 0.6, 0.3])
    n = 20000
    gen = torch.Generator().manual_seed(1)
    tokens, _ = sample_tokens(probs.log().repeat(n, 1), batch(n), torch.rand(n, generator=gen))
    freq = torch.bincount(tokens, minlength=3).float() / n
    assert torch.allclose(freq, probs, atol=0.015)


def test_find_stop_string_returns_earliest():
    assert find_stop_string("abc the end.", ("end", "the")) == "the"
    assert find_stop_string("abc", ("x",)) is None


def test_sampling_params_validation_names_the_field():
    with pytest.raises(ValueError, match="top_p must be in"):
        SamplingParams(top_p=0).validate()
    with pytest.raises(ValueError, match="temperature must be a number >= 0"):
        SamplingParams(temperature=-1).validate()
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingParams(max_new_tokens=-2).validate()
    assert SamplingParams(stop="x").stop == ("x",)


# ---- SGLang JSON -----------------------------------------------------------------------------------------
def rid_counter():
    counter = iter(range(1000))
    return lambda: f"auto-{next(counter)}"


def test_parse_single_and_batch_generate_requests():
    reqs, is_batch = parse_generate_request(
        {
            "input_ids": [1, 2, 3],
            "sampling_params": {"temperature": 0.5, "max_new_tokens": 4, "sampling_seed": 7},
            "return_logprob": True,
        },
        None,
        rid_counter(),
    )
    assert not is_batch and len(reqs) == 1
    assert reqs[0].sampling_params == SamplingParams(temperature=0.5, max_new_tokens=4, seed=7)
    assert reqs[0].return_logprob and list(reqs[0].input_ids) == [1, 2, 3] and reqs[0].rid == "auto-0"
    reqs, is_batch = parse_generate_request(
        {"input_ids": [[1], [2, 3]], "sampling_params": [{"top_k": 5}, {"top_k": 2}], "rid": ["a", "b"]},
        None,
        rid_counter(),
    )
    assert is_batch and [r.rid for r in reqs] == ["a", "b"] and [r.sampling_params.top_k for r in reqs] == [5, 2]
    reqs, _ = parse_generate_request({"text": ["ab", "c"]}, lambda s: [ord(ch) for ch in s], rid_counter())
    assert [list(r.input_ids) for r in reqs] == [[97, 98], [99]]


@pytest.mark.parametrize(
    "body, message",
    [
        ({"input_ids": [1], "text": "x"}, "exactly one of input_ids and text"),
        ({"input_ids": []}, "input_ids must be a non-empty list"),
        ({"input_ids": [1, "a"]}, "input_ids must be a list of integers"),
        ({"input_ids": [1], "sampling_params": {"top_p": 2}}, "top_p must be in"),
        ({"input_ids": [1], "sampling_params": {"temprature": 1}}, "temprature is not a known sampling parameter"),
        ({"input_ids": [1], "sampling_params": {"frequency_penalty": 0.5}}, "frequency_penalty=0.5 is not supported"),
        ({"input_ids": [1], "sampling_params": {"max_new_tokens": "ten"}}, "max_new_tokens must be an integer"),
        ({"input_ids": [[1], [2]], "sampling_params": [{}]}, "sampling_params has 1 entries for 2 prompts"),
        ({"input_ids": [1], "stream": True}, "stream=true is not supported"),
        ({"text": "hi"}, "text input needs a tokenizer"),
        ([1, 2], "must be a JSON object"),
    ],
)
def test_bad_generate_requests_name_the_field(body, message):
    with pytest.raises(ProtocolError, match=message):
        parse_generate_request(body, None, rid_counter())


def test_sampling_params_json_round_trip():
    params = SamplingParams(
        temperature=0.3,
        top_p=0.9,
        top_k=20,
        min_p=0.05,
        max_new_tokens=9,
        stop_token_ids=(4, 5),
        stop=("\n",),
        ignore_eos=True,
        seed=3,
    )
    assert parse_sampling_params(sampling_params_to_json(params)) == params


def test_response_shape_and_round_trip():
    result = GenerateResult(
        "r1", [7, 8, 2], [-0.5, -1.0, -0.1], "stop", weight_version=4, prompt_tokens=3, text="ab", matched_stop=2
    )
    payload = generate_response_json(result)
    assert payload["meta_info"]["finish_reason"] == {"type": "stop", "matched": 2}
    assert payload["meta_info"]["output_token_logprobs"] == [[-0.5, 7, None], [-1.0, 8, None], [-0.1, 2, None]]
    assert payload["meta_info"]["weight_version"] == "4" and payload["meta_info"]["completion_tokens"] == 3
    assert parse_generate_response(payload, "r1") == result


def test_parse_sglang_shaped_responses():
    # As SGLang's tokenizer manager returns them (logprob entries are (logprob, token id, text)).
    length = {
        "text": "x",
        "meta_info": {
            "id": "q",
            "finish_reason": {"type": "length", "length": 2},
            "prompt_tokens": 5,
            "output_token_logprobs": [[-0.25, 11, None], [-2.0, 12, None]],
            "weight_version": "default",
        },
    }
    parsed = parse_generate_response(length, "q")
    assert (parsed.output_ids, parsed.output_log_probs, parsed.finish_reason, parsed.weight_version) == (
        [11, 12],
        [-0.25, -2.0],
        "length",
        0,
    )
    aborted = {
        "text": "",
        "output_ids": [3],
        "meta_info": {"id": "q", "finish_reason": {"type": "abort", "message": "Abort before prefill"}},
    }
    parsed = parse_generate_response(aborted, "q")
    assert parsed.finish_reason == "abort" and parsed.output_ids == [3] and parsed.output_log_probs is None
    bad = {
        "text": "",
        "meta_info": {"id": "q", "finish_reason": {"type": "abort", "message": "too long", "status_code": 400}},
    }
    assert parse_generate_response(bad, "q").finish_reason == "error"


def test_tensor_serialization_round_trip_is_sglang_format():
    named = [("a.weight", torch.randn(3, 4)), ("b.bias", torch.arange(5, dtype=torch.float32)[1:])]
    encoded = serialize_named_tensors(named)
    assert isinstance(encoded, str)
    decoded = deserialize_named_tensors(encoded)
    assert [n for n, _ in decoded] == ["a.weight", "b.bias"]
    assert all(torch.equal(x, y) for (_, x), (_, y) in zip(named, decoded))
    with pytest.raises(ProtocolError, match="not a serialized tensor list"):
        deserialize_named_tensors("not base64!!")


# ---- --sglang-* pass-through ----------------------------------------------------------------------------
def sglang_like_parser():
    # The shapes SGLang's ServerArgs.add_cli_args produces: typed options and store_true flags.
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--mem-fraction-static", type=float)
    parser.add_argument("--enable-memory-saver", action="store_true")
    parser.add_argument("--tp-size", type=int, default=1)
    return parser


def test_server_argv_uses_the_parser_for_flags_and_types():
    argv = server_argv(
        {"mem_fraction_static": "0.7", "enable_memory_saver": "true", "tp_size": "2"}, sglang_like_parser()
    )
    assert argv == ["--mem-fraction-static", "0.7", "--enable-memory-saver", "--tp-size", "2"]
    with pytest.raises(
        Exception, match="--sglang-mem-fractoin: the installed sglang has no server option --mem-fractoin"
    ):
        server_argv({"mem_fractoin": "0.7"}, sglang_like_parser())
    with pytest.raises(Exception, match="rejected by sglang: .*invalid int value"):
        server_argv({"tp_size": "two"}, sglang_like_parser())
    with pytest.raises(Exception, match="--sglang-port is set by slime itself"):
        server_argv({"port": "1"}, sglang_like_parser())


def test_generate_request_dataclass_defaults():
    request = GenerateRequest("x", [1])
    assert request.return_logprob and request.sampling_params.max_new_tokens == 128
    assert math.isclose(request.sampling_params.temperature, 1.0)
