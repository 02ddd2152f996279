"""The embedded engine against real transformers models built locally: logits, greedy decoding under
continuous batching, log-probs, seeded sampling, weight updates in place, bad input, control calls."""

import threading
import time
from pathlib import Path

import pytest
import torch
from tiny_models import build_model, hf_greedy

from slime.rollout.engines.base import EngineError, GenerateRequest, SamplingParams, WeightUpdateError
from slime.rollout.engines.embedded.engine import EmbeddedEngine
from slime.rollout.engines.embedded.model import DecoderSpec, ModelConfigError
from slime.testing.ci_register import register_cpu_ci

register_cpu_ci(est_time=25, suite="base-b-test-cpu")

torch.set_num_threads(1)
FAMILIES = {"qwen3": dict(), "qwen2": dict(tie=True), "llama": dict()}
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [3] * 12, [40, 41, 42, 43], [7], [100, 101, 102]]


def greedy(n, **kw):
    return SamplingParams(temperature=0.0, max_new_tokens=n, ignore_eos=True, **kw)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    out = {}
    for family, kw in FAMILIES.items():
        path = str(tmp_path_factory.mktemp(family))
        out[family] = (path, build_model(family, path, **kw))
    b_path = str(tmp_path_factory.mktemp("qwen3_b"))
    out["qwen3_b"] = (b_path, build_model("qwen3", b_path, seed=1))
    return out


@pytest.fixture(scope="module")
def engine(checkpoints):
    eng = EmbeddedEngine(checkpoints["qwen3"][0], max_batch_size=4, max_seq_len=64, seed=0)
    yield eng
    eng.shutdown()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_prefill_logits_equal_hf_on_a_mixed_length_batch(checkpoints, family):
    path, hf = checkpoints[family]
    eng = EmbeddedEngine(path, max_batch_size=len(PROMPTS), max_seq_len=64)
    try:
        width = max(map(len, PROMPTS))
        tokens = torch.zeros(len(PROMPTS), width, dtype=torch.long)
        for i, p in enumerate(PROMPTS):
            tokens[i, : len(p)] = torch.tensor(p)
        ours = eng.model.prefill(
            tokens, torch.tensor([len(p) for p in PROMPTS]), torch.arange(len(PROMPTS)), all_logits=True
        )
        for i, p in enumerate(PROMPTS):
            with torch.no_grad():
                ref = hf(torch.tensor([p])).logits[0]
            assert (ours[i, : len(p)] - ref).abs().max().item() < 1e-5
    finally:
        eng.shutdown()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_equals_hf_with_more_requests_than_slots(checkpoints, family):
    path, hf = checkpoints[family]
    # 3 slots for 6 requests of different lengths and budgets: finished sequences hand their slots on.
    eng = EmbeddedEngine(path, max_batch_size=3, max_seq_len=64)
    try:
        budgets = [12, 3, 9, 1, 15, 6]
        results = eng.generate(
            [GenerateRequest(f"r{i}", p, greedy(n)) for i, (p, n) in enumerate(zip(PROMPTS, budgets))]
        )
        for p, n, result in zip(PROMPTS, budgets, results):
            assert result.output_ids == hf_greedy(hf, p, n)
            assert result.finish_reason == "length" and len(result.output_log_probs) == n
    finally:
        eng.shutdown()


def test_a_rollouts_tail_decodes_only_its_running_slots(checkpoints):
    """Once most slots have finished, decode computes the running slots only (their cache rows gathered):
    the tokens stay HF's and the log-probs those of the full-width decode."""
    path, hf = checkpoints["qwen3"]
    eng = EmbeddedEngine(path, max_batch_size=6, max_seq_len=64)
    widths = []
    real_decode = eng.model.decode

    def recording_decode(tokens, positions, attend_len, slots=None):
        widths.append((tokens.shape[0], None if slots is None else slots.tolist()))
        return real_decode(tokens, positions, attend_len, slots)

    eng.model.decode = recording_decode
    try:
        budgets = [14, 2, 2, 3, 2, 10]  # after three tokens only slots 0 and 5 run
        requests = [GenerateRequest(f"t{i}", p, greedy(n)) for i, (p, n) in enumerate(zip(PROMPTS, budgets))]
        results = eng.generate(requests)
        assert (2, [0, 5]) in widths and widths[0][1] is None
        for p, n, result in zip(PROMPTS, budgets, results):
            assert result.output_ids == hf_greedy(hf, p, n)
        eng.model.decode = real_decode  # the last request alone: decoded at full width, slot 0
        alone = eng.generate([requests[0]])[0]
        assert torch.allclose(
            torch.tensor(alone.output_log_probs), torch.tensor(results[0].output_log_probs), atol=1e-5
        )
    finally:
        eng.shutdown()


def test_decode_logprobs_equal_hf_full_forward(checkpoints, engine):
    """What the trainer computes at step 0: log_softmax(logits / T) of each sampled token, from one full forward."""
    _, hf = checkpoints["qwen3"]
    temperature = 0.8
    params = SamplingParams(temperature=temperature, top_k=20, top_p=0.9, max_new_tokens=10, ignore_eos=True, seed=5)
    results = engine.generate([GenerateRequest(f"lp{i}", p, params) for i, p in enumerate(PROMPTS[:4])])
    for prompt, result in zip(PROMPTS, results):
        full = torch.tensor([prompt + result.output_ids])
        with torch.no_grad():
            logits = hf(full).logits[0, len(prompt) - 1 : -1] / temperature
        expected = torch.log_softmax(logits, -1).gather(1, torch.tensor(result.output_ids).view(-1, 1)).view(-1)
        assert torch.allclose(torch.tensor(result.output_log_probs), expected, atol=1e-5)


def test_seeded_sampling_is_reproducible_whatever_the_batch(engine):
    params = SamplingParams(temperature=1.0, max_new_tokens=12, ignore_eos=True, seed=1234)
    alone = engine.generate([GenerateRequest("s", PROMPTS[0], params)])[0]
    crowd = engine.generate(
        [
            GenerateRequest(f"o{i}", p, SamplingParams(temperature=1.0, max_new_tokens=12, ignore_eos=True))
            for i, p in enumerate(PROMPTS[1:4])
        ]
        + [GenerateRequest("s", PROMPTS[0], params)]
    )[-1]
    # Same tokens; log-probs equal up to float rounding (matmul blocking depends on the batch size).
    assert alone.output_ids == crowd.output_ids
    assert torch.allclose(torch.tensor(alone.output_log_probs), torch.tensor(crowd.output_log_probs), atol=1e-5)
    other_seed = engine.generate(
        [GenerateRequest("s", PROMPTS[0], SamplingParams(temperature=1.0, max_new_tokens=12, ignore_eos=True, seed=99))]
    )[0]
    assert other_seed.output_ids != alone.output_ids


def test_a_group_sharing_its_prompt_is_prefilled_once_and_samples_as_if_alone(checkpoints):
    """GRPO sends n samples of one prompt: the prompt is prefilled once and its cache copied into the other
    slots. Each sample must still draw what it draws alone, and greedy ones must equal HF's."""
    path, hf = checkpoints["qwen3"]
    eng = EmbeddedEngine(path, max_batch_size=8, max_seq_len=64)
    prefilled_rows = []
    real_prefill = eng.model.prefill
    eng.model.prefill = lambda tokens, *a, **kw: (
        prefilled_rows.append(tokens.shape[0]) or real_prefill(tokens, *a, **kw)
    )
    try:
        group = [GenerateRequest(f"g{i}", PROMPTS[0], SamplingParams(temperature=1.0, max_new_tokens=8, seed=i))
                 for i in range(6)]  # fmt: skip
        requests = group + [
            GenerateRequest("greedy", PROMPTS[0], greedy(8)),
            GenerateRequest("other", PROMPTS[1], greedy(8)),
        ]
        finished: dict[str, object] = {}
        all_done = threading.Event()

        def collect(result):
            finished[result.rid] = result
            if len(finished) == len(requests):
                all_done.set()

        eng.pause()  # queue all eight first, so they are admitted together
        for request in requests:
            eng.submit(request, collect)
        eng.resume()
        assert all_done.wait(60)
        together = [finished[r.rid] for r in requests]
        assert prefilled_rows == [2]  # two distinct prompts for eight requests
        alone = [eng.generate([request])[0] for request in group]
        assert [r.output_ids for r in together[:6]] == [r.output_ids for r in alone]
        assert len({tuple(r.output_ids) for r in alone}) > 1  # the seeds really differ
        assert together[6].output_ids == hf_greedy(hf, PROMPTS[0], 8)
        assert together[7].output_ids == hf_greedy(hf, PROMPTS[1], 8)
    finally:
        eng.shutdown()


def test_engine_seed_makes_unseeded_runs_reproducible(checkpoints):
    path, _ = checkpoints["llama"]
    runs = []
    for _ in range(2):
        eng = EmbeddedEngine(path, max_batch_size=4, max_seq_len=64, seed=7)
        try:
            runs.append(
                [
                    r.output_ids
                    for r in eng.generate(
                        [GenerateRequest(f"u{i}", p, SamplingParams(max_new_tokens=8)) for i, p in enumerate(PROMPTS)]
                    )
                ]
            )
        finally:
            eng.shutdown()
    assert runs[0] == runs[1]


def test_stop_tokens_and_finish_reasons(checkpoints, engine):
    _, hf = checkpoints["qwen3"]
    ref = hf_greedy(hf, PROMPTS[0], 8)
    stop_at = ref[3]
    first = ref.index(stop_at)
    result = engine.generate([GenerateRequest("st", PROMPTS[0], greedy(8, stop_token_ids=[stop_at]))])[0]
    assert result.finish_reason == "stop" and result.output_ids == ref[: first + 1] and result.matched_stop == stop_at
    zero = engine.generate([GenerateRequest("z", PROMPTS[0], greedy(0))])[0]
    assert zero.finish_reason == "length" and zero.output_ids == []
    # The context bounds the output: 64 - 7 prompt tokens leaves 57.
    capped = engine.generate([GenerateRequest("c", PROMPTS[0], greedy(500))])[0]
    assert capped.finish_reason == "length" and len(capped.output_ids) == 64 - len(PROMPTS[0])


def test_eos_stops_unless_ignored(tmp_path):
    path = str(tmp_path / "m")
    hf = build_model("qwen3", path, seed=3)
    ref = hf_greedy(hf, [9, 8, 7], 6)
    # Make the model's EOS the token greedy decoding produces third.
    import json

    config_path = Path(path) / "config.json"
    config = json.loads(config_path.read_text())
    config["eos_token_id"] = ref[2]
    config_path.write_text(json.dumps(config))
    eng = EmbeddedEngine(path, max_batch_size=2, max_seq_len=32)
    try:
        stopped, ignored = eng.generate(
            [
                GenerateRequest("a", [9, 8, 7], SamplingParams(temperature=0, max_new_tokens=6)),
                GenerateRequest("b", [9, 8, 7], SamplingParams(temperature=0, max_new_tokens=6, ignore_eos=True)),
            ]
        )
        assert stopped.finish_reason == "stop" and stopped.output_ids == ref[: ref.index(ref[2]) + 1]
        assert ignored.finish_reason == "length" and ignored.output_ids == ref
    finally:
        eng.shutdown()


def test_bad_requests_fail_alone(engine, checkpoints):
    _, hf = checkpoints["qwen3"]
    results = engine.generate(
        [
            GenerateRequest("long", list(range(2, 70)), greedy(4)),
            GenerateRequest("ok", PROMPTS[1], greedy(5)),
            GenerateRequest("vocab", [5, 100000], greedy(4)),
            GenerateRequest("params", [5], SamplingParams(top_p=1.5)),
            GenerateRequest("empty", [], greedy(4)),
            GenerateRequest("stopstr", [5], SamplingParams(stop=("x",))),
        ]
    )
    by_rid = {r.rid: r for r in results}
    assert (
        by_rid["long"].finish_reason == "error"
        and "longer than the engine's context (max_seq_len 64" in by_rid["long"].error
    )
    assert (
        by_rid["vocab"].finish_reason == "error"
        and "token id 100000 outside the vocabulary [0, 320)" in by_rid["vocab"].error
    )
    assert by_rid["params"].finish_reason == "error" and "top_p" in by_rid["params"].error
    assert by_rid["empty"].finish_reason == "error"
    assert by_rid["stopstr"].finish_reason == "error" and "needs a tokenizer" in by_rid["stopstr"].error
    assert by_rid["ok"].output_ids == hf_greedy(hf, PROMPTS[1], 5)
    assert engine.health()


def test_weight_updates_in_place_bucketed_then_rejected_whole(checkpoints):
    path_a, hf_a = checkpoints["qwen3"]
    _, hf_b = checkpoints["qwen3_b"]
    eng = EmbeddedEngine(path_a, max_batch_size=4, max_seq_len=64)
    try:
        pointers = {n: t.data_ptr() for n, t in eng.named_weights().items()}
        items = list(hf_b.state_dict().items())
        half = len(items) // 2
        eng.update_weights_from_tensors(items[:half], version=1, finish=False)
        # Nothing applies before the final bucket.
        assert eng.weight_version == 0
        assert eng.generate([GenerateRequest("a", PROMPTS[0], greedy(8))])[0].output_ids == hf_greedy(
            hf_a, PROMPTS[0], 8
        )
        eng.update_weights_from_tensors(items[half:], version=1, finish=True)
        assert eng.weight_version == 1
        assert {n: t.data_ptr() for n, t in eng.named_weights().items()} == pointers  # in place, no rebuild
        for i, p in enumerate(PROMPTS[:3]):
            result = eng.generate([GenerateRequest(f"b{i}", p, greedy(8))])[0]
            assert result.output_ids == hf_greedy(hf_b, p, 8) and result.weight_version == 1

        # A multi-bucket update whose second bucket is bad is rejected whole: the engine keeps version 1.
        a_items = list(hf_a.state_dict().items())
        eng.update_weights_from_tensors(a_items[:half], version=2, finish=False)
        with pytest.raises(WeightUpdateError, match=r"'model.norm.weight' has shape \(3,\), the model expects \(64,\)"):
            eng.update_weights_from_tensors([("model.norm.weight", torch.ones(3))], version=2, finish=True)
        with pytest.raises(WeightUpdateError, match="unknown tensor name 'model.layers.9.mlp.up_proj.weight'"):
            eng.update_weights_from_tensors([("model.layers.9.mlp.up_proj.weight", torch.ones(128, 64))], version=2)
        eng.update_weights_from_tensors(
            [], version=2, finish=True
        )  # an empty finishing bucket: nothing staged survived
        assert eng.generate([GenerateRequest("c", PROMPTS[0], greedy(8))])[0].output_ids == hf_greedy(
            hf_b, PROMPTS[0], 8
        )

        eng.update_weights_from_disk(path_a, version=3)
        assert eng.weight_version == 3
        assert eng.generate([GenerateRequest("d", PROMPTS[0], greedy(8))])[0].output_ids == hf_greedy(
            hf_a, PROMPTS[0], 8
        )
        with pytest.raises(WeightUpdateError, match="describes a different model"):
            eng.update_weights_from_disk(checkpoints["llama"][0], version=4)
    finally:
        eng.shutdown()


def test_abort_pause_resume_and_memory(engine):
    results = {}
    done = threading.Event()

    def keep(result):
        results[result.rid] = result
        if len(results) == 3:
            done.set()

    engine.pause()
    for rid in ("x", "y", "w"):
        engine.submit(GenerateRequest(rid, PROMPTS[0], greedy(50)), keep)
    time.sleep(0.2)
    assert results == {} and engine.num_waiting() == 3  # paused: nothing ran
    engine.resume()
    while engine.num_running() < 3:
        time.sleep(0.001)
    engine.pause()  # frozen mid-generation: the sequences keep their slots and partial outputs
    engine.abort("x")
    assert results["x"].finish_reason == "abort" and 1 <= len(results["x"].output_ids) < 50
    assert engine.num_running() == 2
    engine.abort()
    assert done.wait(10)
    assert results["y"].finish_reason == "abort" and results["w"].finish_reason == "abort"
    engine.resume()

    engine.release_memory()
    assert not engine.model.kv_cache_allocated
    got = []
    engine.submit(GenerateRequest("after", PROMPTS[1], greedy(3)), got.append)
    time.sleep(0.1)
    assert got == []  # waits for memory
    engine.resume_memory()
    deadline = time.time() + 10
    while not got and time.time() < deadline:
        time.sleep(0.01)
    assert got and got[0].finish_reason == "length" and len(got[0].output_ids) == 3


def test_release_memory_refuses_while_running(engine):
    engine.pause()
    try:
        engine.submit(GenerateRequest("busy", PROMPTS[0], greedy(40)), lambda r: None)
        engine.resume()
        while engine.num_running() == 0:
            time.sleep(0.001)
        engine.pause()
        with pytest.raises(EngineError, match="needs an idle engine, but 1 request"):
            engine.release_memory()
    finally:
        engine.abort()
        engine.resume()


def test_unsupported_config_is_one_line(tmp_path):
    with pytest.raises(ModelConfigError, match="model_type 'gpt2' is not supported by the embedded engine"):
        DecoderSpec.from_hf_config({"model_type": "gpt2"}, source="x/config.json")
    with pytest.raises(ModelConfigError, match="no config.json"):
        EmbeddedEngine(str(tmp_path))
