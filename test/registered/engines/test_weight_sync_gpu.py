"""Weight sync against a real SGLang server on one GPU, with the trainer side's own senders
(slime.ray.weight_sync): "ipc" hands CUDA-IPC handles (device UUID in the handle, SGLang's format) to the
colocated server, and "broadcast" forms SGLang's weight group and broadcasts bucket by bucket. Both must leave
the server generating exactly what HF generates with the new weights, at the new version.
On a machine without a usable cuda backend every test skips with the reason."""

import pytest
from tiny_models import build_model, hf_greedy

from slime.backends import BackendUnavailable, select_backend
from slime.ray.weight_sync import BroadcastSender, send_ipc
from slime.rollout.engines.base import GenerateRequest, SamplingParams
from slime.rollout.engines.sglang.launcher import SGLangEngine, SGLangServerConfig
from slime.testing.ci_register import register_cuda_ci

register_cuda_ci(est_time=240, suite="base-b-test-1-gpu")

try:
    BACKEND = select_backend("cuda")
except BackendUnavailable as e:
    pytest.skip(f"needs a GPU with the cuda stack: {e}", allow_module_level=True)

PROMPT = [5, 6, 7, 8]
SERVER_OPTIONS = {"mem_fraction_static": "0.3", "disable_cuda_graph": "true", "skip_server_warmup": "true"}


def greedy(n):
    return SamplingParams(temperature=0.0, max_new_tokens=n, ignore_eos=True)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    a = str(tmp_path_factory.mktemp("a"))
    b = str(tmp_path_factory.mktemp("b"))
    return {"a": (a, build_model("qwen3", a, with_tokenizer=True)), "b": (b, build_model("qwen3", b, seed=1))}


@pytest.fixture(scope="module")
def engine(models, tmp_path_factory):
    config = SGLangServerConfig(models["a"][0], SERVER_OPTIONS, log_dir=str(tmp_path_factory.mktemp("logs")))
    with SGLangEngine(config) as eng:
        yield eng


def buckets(model, count: int) -> list[list]:
    named = [(n, t.detach().to("cuda")) for n, t in model.state_dict().items()]
    size = -(-len(named) // count)
    return [named[i : i + size] for i in range(0, len(named), size)]


def test_ipc_handles_update_the_colocated_server(engine, models):
    _, hf_b = models["b"]
    send_ipc(BACKEND, engine.url, buckets(hf_b, 3), version=5, timeout_s=120)
    assert engine.weight_version == 5
    assert engine.generate([GenerateRequest("i", PROMPT, greedy(6))])[0].output_ids == hf_greedy(hf_b, PROMPT, 6)


def test_broadcast_group_updates_the_server(engine, models):
    _, hf_a = models["a"]
    # one GPU holds both ranks, which NCCL refuses; gloo carries the same protocol (SGLang receives on its device)
    sender = BroadcastSender("gloo", "127.0.0.1", timeout_s=120)
    sender.send([engine.url], buckets(hf_a, 2), version=6)
    assert engine.weight_version == 6
    assert engine.generate([GenerateRequest("b", PROMPT, greedy(6))])[0].output_ids == hf_greedy(hf_a, PROMPT, 6)
