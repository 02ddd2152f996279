"""The SGLang-compatible HTTP server and the SGLang client, against each other, for real.

The same contract tests run on the embedded engine in-process and on SGLangClient talking HTTP to the
embedded server, so the client the GPU backends use is exercised on CPU. HTTP-only behaviour (400s,
JSON shapes, concurrency, subprocess launch, launcher failures) follows.
"""

import asyncio
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request

import aiohttp
import pytest
import torch
from tiny_models import build_model, hf_greedy

from slime.rollout.engines.base import EngineError, GenerateRequest, SamplingParams, WeightUpdateError
from slime.rollout.engines.embedded.engine import EmbeddedEngine
from slime.rollout.engines.embedded.server import READY_PREFIX, serve_http
from slime.rollout.engines.sglang.client import SGLangClient
from slime.rollout.engines.sglang.launcher import (
    ServerLaunchError,
    SGLangEngine,
    SGLangServerConfig,
    start_process,
)
from slime.testing.ci_register import register_cpu_ci

register_cpu_ci(est_time=35, suite="base-b-test-cpu")

torch.set_num_threads(1)
EMBEDDED_SERVER = "slime.rollout.engines.embedded.server"
PROMPTS = [[5, 6, 7, 8], [9, 10], [11, 12, 13, 14, 15, 16]]


def greedy(n, **kw):
    return SamplingParams(temperature=0.0, max_new_tokens=n, ignore_eos=True, **kw)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    a = str(tmp_path_factory.mktemp("a"))
    b = str(tmp_path_factory.mktemp("b"))
    return {"a": (a, build_model("qwen3", a, with_tokenizer=True)), "b": (b, build_model("qwen3", b, seed=1))}


@pytest.fixture(scope="module")
def served(models):
    engine = EmbeddedEngine(models["a"][0], max_batch_size=4, max_seq_len=64)
    handle = serve_http(engine)
    yield engine, handle
    handle.stop()
    engine.shutdown()


@pytest.fixture(params=["embedded", "sglang_client"])
def client(request, served):
    engine, handle = served
    yield engine if request.param == "embedded" else SGLangClient(handle.url, timeout_s=60)
    # Leave the shared engine as found: original weights, version 0, running.
    engine.resume()
    engine.abort()


def post(url, body, raw=False):
    data = body if raw else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            text = r.read().decode()
            return r.status, (json.loads(text) if text.startswith(("{", "[")) else text)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read().decode())


# ---- the same contract over both ------------------------------------------------------------------------
def test_greedy_matches_hf(client, models):
    _, hf = models["a"]
    results = client.generate([GenerateRequest(f"g{i}", p, greedy(6)) for i, p in enumerate(PROMPTS)])
    assert [r.output_ids for r in results] == [hf_greedy(hf, p, 6) for p in PROMPTS]
    assert all(r.finish_reason == "length" and len(r.output_log_probs) == 6 for r in results)
    assert [r.rid for r in results] == ["g0", "g1", "g2"]


def test_logprobs_and_seeded_sampling_agree_across_clients(served, models):
    engine, handle = served
    params = SamplingParams(temperature=0.9, top_p=0.95, max_new_tokens=8, ignore_eos=True, seed=11)
    direct = engine.generate([GenerateRequest("s", PROMPTS[0], params)])[0]
    remote = SGLangClient(handle.url).generate([GenerateRequest("s", PROMPTS[0], params)])[0]
    assert direct.output_ids == remote.output_ids
    assert torch.allclose(torch.tensor(direct.output_log_probs), torch.tensor(remote.output_log_probs), atol=1e-6)


def test_bucketed_weight_update_then_rejected_update_keeps_serving(client, models):
    _, hf_a = models["a"]
    b_path, hf_b = models["b"]
    items = list(hf_b.state_dict().items())
    try:
        client.begin_weight_update()
        client.update_weights_from_tensors(items[:10], version=5, finish=False)
        client.update_weights_from_tensors(items[10:], version=5, finish=True)
        client.end_weight_update()
        assert client.weight_version == 5
        result = client.generate([GenerateRequest("u", PROMPTS[0], greedy(6))])[0]
        assert result.output_ids == hf_greedy(hf_b, PROMPTS[0], 6) and result.weight_version == 5
        with pytest.raises(
            WeightUpdateError, match=r"'lm_head.weight' has shape \(2, 2\), the model expects \(320, 64\)"
        ):
            client.update_weights_from_tensors([("lm_head.weight", torch.zeros(2, 2))], version=6)
        assert client.weight_version == 5
        assert client.generate([GenerateRequest("v", PROMPTS[0], greedy(6))])[0].output_ids == hf_greedy(
            hf_b, PROMPTS[0], 6
        )
    finally:
        client.update_weights_from_disk(models["a"][0], version=0)
    assert client.generate([GenerateRequest("w", PROMPTS[0], greedy(6))])[0].output_ids == hf_greedy(
        hf_a, PROMPTS[0], 6
    )


def test_too_long_prompt_is_an_error_for_that_request_only(client, models):
    _, hf = models["a"]
    results = client.generate(
        [GenerateRequest("long", list(range(2, 80)), greedy(3)), GenerateRequest("fine", PROMPTS[1], greedy(3))]
    )
    assert results[0].finish_reason == "error" and "longer than the engine's context" in results[0].error
    assert results[1].output_ids == hf_greedy(hf, PROMPTS[1], 3)
    assert client.health()


def test_pause_abort_resume(client, served):
    engine, _ = served
    client.pause()
    out = []
    engine.submit(GenerateRequest("p", PROMPTS[0], greedy(30)), out.append)
    time.sleep(0.1)
    assert out == []
    client.abort("p")
    assert out and out[0].finish_reason == "abort"
    client.resume()
    assert client.generate([GenerateRequest("q", PROMPTS[1], greedy(2))])[0].finish_reason == "length"


def test_release_and_resume_memory(client, served):
    engine, _ = served
    client.release_memory()
    assert not engine.model.kv_cache_allocated
    client.resume_memory()
    assert engine.model.kv_cache_allocated
    assert client.generate([GenerateRequest("m", PROMPTS[1], greedy(2))])[0].finish_reason == "length"


def test_memory_tags_release_only_what_they_name(client, served):
    engine, _ = served
    client.release_memory(["weights"])  # the embedded engine's weights stay on the host: nothing to free
    assert engine.model.kv_cache_allocated
    client.release_memory(["kv_cache"])
    assert not engine.model.kv_cache_allocated
    client.resume_memory(["weights"])
    assert not engine.model.kv_cache_allocated
    client.resume_memory(["kv_cache"])
    assert engine.model.kv_cache_allocated
    with pytest.raises(
        EngineError, match=r"memory tags must be a list drawn from \['weights', 'kv_cache'\], got \['gpu'\]"
    ):
        client.release_memory(["gpu"])


# ---- HTTP only ------------------------------------------------------------------------------------------
def test_generate_json_shapes(served):
    _, handle = served
    status, single = post(
        handle.url + "/generate",
        {"input_ids": PROMPTS[0], "sampling_params": {"temperature": 0, "max_new_tokens": 3}, "return_logprob": True},
    )
    assert status == 200 and set(single) == {"text", "output_ids", "meta_info"}
    meta = single["meta_info"]
    assert meta["finish_reason"]["type"] in ("length", "stop") and meta["prompt_tokens"] == 4
    assert [entry[1] for entry in meta["output_token_logprobs"]] == single["output_ids"]
    assert all(len(entry) == 3 and entry[0] <= 0 for entry in meta["output_token_logprobs"])
    status, batch = post(handle.url + "/generate", {"input_ids": PROMPTS[:2], "sampling_params": {"max_new_tokens": 2}})
    assert (
        status == 200
        and isinstance(batch, list)
        and len(batch) == 2
        and "output_token_logprobs" not in batch[0]["meta_info"]
    )
    status, text = post(
        handle.url + "/generate", {"text": "the quick", "sampling_params": {"temperature": 0, "max_new_tokens": 4}}
    )
    assert status == 200 and text["meta_info"]["prompt_tokens"] > 0 and isinstance(text["text"], str)


def test_stop_string_over_http(served):
    engine, handle = served
    status, first = post(
        handle.url + "/generate",
        {"text": "one two", "sampling_params": {"temperature": 0, "max_new_tokens": 12, "ignore_eos": True}},
    )
    target = first["text"][2:4] if len(first["text"]) >= 4 else None
    if not target or not target.strip():
        pytest.skip("greedy text too short to pick a stop string")
    status, stopped = post(
        handle.url + "/generate",
        {
            "text": "one two",
            "sampling_params": {"temperature": 0, "max_new_tokens": 12, "ignore_eos": True, "stop": [target]},
        },
    )
    assert status == 200 and stopped["meta_info"]["finish_reason"] == {"type": "stop", "matched": target}
    assert target in engine.tokenizer.decode(stopped["output_ids"])


@pytest.mark.parametrize(
    "path, body, message",
    [
        ("/generate", {"input_ids": [1], "sampling_params": {"top_k": "many"}}, "top_k must be an integer"),
        ("/generate", {"input_ids": [1], "sampling_params": {"bogus": 1}}, "bogus is not a known sampling parameter"),
        ("/generate", {"input_ids": "abc"}, "input_ids must be a non-empty list"),
        ("/generate", b"{not json", "not valid JSON"),
        ("/generate", {"input_ids": list(range(2, 90))}, "longer than the engine's context"),
        ("/update_weights_from_tensor", {"serialized_named_tensors": "x"}, "must be a non-empty list"),
        ("/update_weights_from_tensor", {"serialized_named_tensors": ["@@"]}, "not a serialized tensor list"),
        ("/update_weights_from_disk", {"model_path": "/nonexistent"}, "no config.json"),
        ("/update_weights_from_disk", {"model_path": 3}, "model_path must be a folder path"),
        ("/update_weights_from_distributed", {"names": ["x"], "dtypes": ["float32"], "shapes": [[1]]}, "not set up"),
        ("/update_weights_from_distributed", {"names": ["x"], "dtypes": ["int4"], "shapes": [[1]]}, "not one of"),
        ("/pause_generation", {"mode": "later"}, "mode must be one of"),
        ("/abort_request", {"abort_all": "yes"}, "abort_all must be true or false"),
    ],
)
def test_invalid_fields_get_400_and_the_server_keeps_serving(served, path, body, message):
    _, handle = served
    status, answer = post(handle.url + path, body, raw=isinstance(body, bytes))
    assert status == 400 and message in answer["error"]["message"]
    assert urllib.request.urlopen(handle.url + "/health", timeout=10).status == 200
    status, ok = post(handle.url + "/generate", {"input_ids": [5], "sampling_params": {"max_new_tokens": 1}})
    assert status == 200


def test_flattened_bucket_payload_updates_the_served_engine(served, models):
    """SGLang's load_format "flattened_bucket" (the format the ipc transport sends, here with host memory)."""
    import base64
    import pickle

    from slime.rollout.engines.protocol import FLATTENED_BUCKET, flatten_bucket

    engine, handle = served
    _, hf_b = models["b"]
    client = SGLangClient(handle.url, timeout_s=60)
    items = list(hf_b.state_dict().items())
    client.begin_weight_update()
    for i, part in enumerate((items[:7], items[7:])):
        payload = base64.b64encode(pickle.dumps(flatten_bucket(part))).decode()
        client.update_weights_from_serialized([payload], 9, finish=i == 1, load_format=FLATTENED_BUCKET)
    client.end_weight_update()
    try:
        assert client.weight_version == 9
        [result] = client.generate([GenerateRequest("f", PROMPTS[0], greedy(6))])
        assert result.output_ids == hf_greedy(hf_b, PROMPTS[0], 6)
    finally:
        client.update_weights_from_disk(models["a"][0], version=0)


def test_model_info_and_weight_version(served):
    _, handle = served
    info = json.load(urllib.request.urlopen(handle.url + "/get_model_info", timeout=10))
    assert info["weight_version"] == "0" and info["is_generation"] is True and info["model_type"] == "qwen3"
    assert json.load(urllib.request.urlopen(handle.url + "/get_weight_version", timeout=10)) == {"weight_version": "0"}
    status, _ = post(handle.url + "/flush_cache", {})
    assert status == 200


def test_concurrent_requests_are_batched_and_all_correct(models):
    """64 concurrent posts into 8 slots: all answered, all equal to HF greedy, and batches really formed."""
    path, hf = models["a"]
    engine = EmbeddedEngine(path, max_batch_size=8, max_seq_len=64)
    handle = serve_http(engine)
    batch_sizes = []
    decode = engine.model.decode

    def counting_decode(tokens, positions, attend_len, slots=None):
        batch_sizes.append(tokens.shape[0])
        return decode(tokens, positions, attend_len, slots)

    engine.model.decode = counting_decode
    prompts = [[(7 * i) % 300 + 2, (11 * i) % 300 + 2, 5] for i in range(64)]

    async def run():
        async with aiohttp.ClientSession() as session:

            async def one(i):
                body = {
                    "input_ids": prompts[i],
                    "sampling_params": {"temperature": 0, "max_new_tokens": 5, "ignore_eos": True},
                    "return_logprob": True,
                }
                async with session.post(handle.url + "/generate", json=body) as r:
                    return await r.json()

            return await asyncio.gather(*(one(i) for i in range(64)))

    try:
        answers = asyncio.run(run())
        assert [a["output_ids"] for a in answers] == [hf_greedy(hf, p, 5) for p in prompts]
        assert max(batch_sizes) == 8
    finally:
        handle.stop()
        engine.shutdown()


def test_server_subprocess_prints_ready_line_and_serves(models):
    path, hf = models["a"]
    proc = subprocess.Popen(
        [sys.executable, "-m", EMBEDDED_SERVER, "--model", path, "--port", "0", "--max-seq-len", "64"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )
    try:
        line = ""
        deadline = time.time() + 120
        while time.time() < deadline:
            line = proc.stdout.readline()
            if line.startswith(READY_PREFIX) or not line:
                break
        assert line.startswith(READY_PREFIX), line
        url = line[len(READY_PREFIX) :].strip()
        assert url.startswith("http://127.0.0.1:")
        result = SGLangClient(url).generate([GenerateRequest("x", PROMPTS[0], greedy(4))])[0]
        assert result.output_ids == hf_greedy(hf, PROMPTS[0], 4)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_launcher_readiness_and_failures(models, tmp_path):
    path, hf = models["a"]
    # The launch path SGLang uses, pointed at the embedded server (same CLI: --model-path/--host/--port).
    config = SGLangServerConfig(
        model_path=path,
        launch_module=EMBEDDED_SERVER,
        startup_timeout_s=120,
        log_dir=str(tmp_path),
        env={"OMP_NUM_THREADS": "1"},
    )
    with SGLangEngine(config) as engine:
        assert engine.health()
        assert engine.generate([GenerateRequest("l", PROMPTS[2], greedy(3))])[0].output_ids == hf_greedy(
            hf, PROMPTS[2], 3
        )
    assert engine.server.process.poll() is not None

    broken = SGLangServerConfig(
        model_path=str(tmp_path / "missing"),
        launch_module=EMBEDDED_SERVER,
        startup_timeout_s=120,
        log_dir=str(tmp_path),
    )
    with pytest.raises(
        ServerLaunchError, match=r"(?s)exited with code 2 before becoming ready.*last lines:.*error: .*no config.json"
    ):
        SGLangEngine(broken)

    silent = start_process(
        [sys.executable, "-c", "print('loading forever', flush=True); import time; time.sleep(60)"],
        "http://127.0.0.1:9",
        str(tmp_path),
        "silent",
    )
    with pytest.raises(ServerLaunchError, match=r"(?s)not ready after 2s.*loading forever"):
        silent.wait_ready(2)
    assert silent.process.poll() is not None  # stopped on timeout


def test_client_errors_are_one_line_when_the_server_is_gone():
    client = SGLangClient("http://127.0.0.1:9", timeout_s=5)
    assert not client.health()
    with pytest.raises(EngineError, match=r"^http://127.0.0.1:9/get_model_info: cannot reach the server"):
        client.get_model_info()
