"""The SGLang adapter against a real SGLang server on a GPU: launch with --sglang-* pass-through, readiness,
generate (greedy equals HF, log-probs equal HF's log_softmax), bucketed weight updates from device tensors
(IPC handles) and from disk, pause / continue, abort, memory release / resume for colocate, router.

CPU suites run the same client against the embedded server (test_http_clients.py); this file needs sglang.
"""

import pytest
import torch
from tiny_models import build_model, hf_greedy

from slime.rollout.engines.base import GenerateRequest, SamplingParams
from slime.rollout.engines.sglang.client import SGLangClient
from slime.rollout.engines.sglang.launcher import SGLangEngine, SGLangServerConfig, launch_router
from slime.testing.ci_register import register_cuda_ci

register_cuda_ci(est_time=420, suite="base-b-test-1-gpu")

sglang = pytest.importorskip("sglang", reason="needs the GPU image with sglang installed")
PROMPTS = [[5, 6, 7, 8], [9, 10, 11], [12, 13]]
SERVER_OPTIONS = {
    "mem_fraction_static": "0.3",
    "enable_memory_saver": "true",
    "disable_cuda_graph": "true",
    "skip_server_warmup": "true",
}


def greedy(n):
    return SamplingParams(temperature=0.0, max_new_tokens=n, ignore_eos=True)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    a = str(tmp_path_factory.mktemp("a"))
    b = str(tmp_path_factory.mktemp("b"))
    return {"a": (a, build_model("qwen3", a, with_tokenizer=True)), "b": (b, build_model("qwen3", b, seed=1))}


@pytest.fixture(scope="module")
def engine(models, tmp_path_factory):
    config = SGLangServerConfig(
        model_path=models["a"][0], server_options=SERVER_OPTIONS, log_dir=str(tmp_path_factory.mktemp("logs"))
    )
    with SGLangEngine(config) as eng:
        yield eng


def test_generate_matches_hf(engine, models):
    _, hf = models["a"]
    results = engine.generate([GenerateRequest(f"g{i}", p, greedy(6)) for i, p in enumerate(PROMPTS)])
    assert [r.output_ids for r in results] == [hf_greedy(hf, p, 6) for p in PROMPTS]
    for prompt, result in zip(PROMPTS, results):
        with torch.no_grad():
            logits = hf(torch.tensor([prompt + result.output_ids])).logits[0, len(prompt) - 1 : -1]
        expected = torch.log_softmax(logits, -1).gather(1, torch.tensor(result.output_ids).view(-1, 1)).view(-1)
        assert torch.allclose(torch.tensor(result.output_log_probs), expected, atol=2e-3)  # GPU kernels, not fp32 HF


def test_weight_updates_from_device_tensors_and_disk(engine, models):
    _, hf_a = models["a"]
    _, hf_b = models["b"]
    device_items = [(n, t.to("cuda")) for n, t in hf_b.state_dict().items()]
    engine.begin_weight_update()
    engine.update_weights_from_tensors(device_items[:8], version=1, finish=False)
    engine.update_weights_from_tensors(device_items[8:], version=1, finish=True)
    engine.end_weight_update()
    assert engine.weight_version == 1
    assert engine.generate([GenerateRequest("b", PROMPTS[0], greedy(6))])[0].output_ids == hf_greedy(
        hf_b, PROMPTS[0], 6
    )
    engine.update_weights_from_disk(models["a"][0], version=2)
    assert engine.weight_version == 2
    assert engine.generate([GenerateRequest("a", PROMPTS[0], greedy(6))])[0].output_ids == hf_greedy(
        hf_a, PROMPTS[0], 6
    )


def test_release_and_resume_memory_then_generate(engine, models):
    engine.release_memory()
    engine.resume_memory()
    _, hf = models["a"]
    assert engine.generate([GenerateRequest("m", PROMPTS[1], greedy(4))])[0].output_ids == hf_greedy(hf, PROMPTS[1], 4)


def test_abort_all_and_health(engine):
    engine.abort()
    assert engine.health()


def test_router_in_front_of_the_server(engine, models, tmp_path):
    pytest.importorskip("sglang_router")
    router = launch_router([engine.url], log_dir=str(tmp_path))
    try:
        _, hf = models["a"]
        result = SGLangClient(router.url).generate([GenerateRequest("r", PROMPTS[2], greedy(4))])[0]
        assert result.output_ids == hf_greedy(hf, PROMPTS[2], 4)
    finally:
        router.stop()
