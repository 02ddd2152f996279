"""A weight update that lands while a request is generating (--fully-async), on the embedded engine: the
request is not aborted, the versions it records for its tokens change exactly at the update, and every token
after the update is sampled from the new weights alone (its log-prob equals the new model's, the sequence so far
teacher-forced), every token before it from the old ones."""

import threading

import pytest
import torch
from tiny_models import build_model

from slime.rollout.engines.base import GenerateRequest, SamplingParams
from slime.rollout.engines.embedded.engine import EmbeddedEngine
from slime.testing.ci_register import register_cpu_ci

register_cpu_ci(est_time=15, suite="base-b-test-cpu")

torch.set_num_threads(1)
PROMPT = [5, 6, 7, 8, 9]
NEW_TOKENS = 48
SWAP_AFTER = 6  # the update is sent once the request has this many tokens


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    a, b = str(tmp_path_factory.mktemp("a")), str(tmp_path_factory.mktemp("b"))
    return (a, build_model("qwen3", a)), (b, build_model("qwen3", b, seed=1))


def teacher_forced_log_probs(hf, prompt: list[int], output: list[int]) -> torch.Tensor:
    """log p(output[i] | prompt + output[:i]) under `hf`, for every i."""
    tokens = torch.tensor([prompt + output])
    with torch.no_grad():
        logits = hf(tokens).logits[0, len(prompt) - 1 : -1].double()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(output)[:, None])[:, 0]


def generate_across_a_swap(path: str, new_weights: dict, temperature: float):
    """Generate one request; once it has SWAP_AFTER tokens the engine stops scheduling (as a pause does; set from
    inside the step, so the test is not at the mercy of thread timing), the update goes in, generation resumes."""
    engine = EmbeddedEngine(path, max_batch_size=2, max_seq_len=128, seed=0)
    params = SamplingParams(temperature=temperature, max_new_tokens=NEW_TOKENS, ignore_eos=True, seed=3)
    reached, results, append = threading.Event(), [], engine._append

    def append_then_pause(seqs, ids, log_probs, finished):
        append(seqs, ids, log_probs, finished)
        if any(len(s.output_ids) == SWAP_AFTER for s in seqs):
            with engine._cond:
                engine._paused = True
            reached.set()

    engine._append = append_then_pause
    try:
        thread = threading.Thread(
            target=lambda: results.extend(engine.generate([GenerateRequest("r", PROMPT, params)]))
        )
        thread.start()
        assert reached.wait(timeout=60), "the request never got going"
        engine.update_weights_from_tensors(list(new_weights.items()), version=1)  # between two steps
        engine.resume()
        thread.join(timeout=120)
    finally:
        engine.shutdown()
    return results[0]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_tokens_after_an_in_flight_update_come_from_the_new_weights(models, temperature):
    (path_a, hf_a), (_, hf_b) = models
    result = generate_across_a_swap(path_a, hf_b.state_dict(), temperature)
    assert result.finish_reason == "length" and len(result.output_ids) == NEW_TOKENS  # not aborted
    versions = result.output_weight_versions
    swap = versions.index(1)
    assert swap == SWAP_AFTER, versions  # the update landed mid-request, right where it was sent
    assert versions == [0] * swap + [1] * (NEW_TOKENS - swap)  # changes once, exactly at the update
    engine_lp = torch.tensor(result.output_log_probs, dtype=torch.float64)
    old = teacher_forced_log_probs(hf_a, PROMPT, result.output_ids)
    new = teacher_forced_log_probs(hf_b, PROMPT, result.output_ids)
    torch.testing.assert_close(engine_lp[:swap], old[:swap], atol=2e-4, rtol=0)
    torch.testing.assert_close(engine_lp[swap:], new[swap:], atol=2e-4, rtol=0)
    assert (engine_lp[swap:] - old[swap:]).abs().max() > 1e-2  # the two models do differ there
