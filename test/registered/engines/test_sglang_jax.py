"""sglang-jax adapter. On CPU: the checkpoint writer and the whole reload-based update protocol, with the
embedded server standing in for the sglang-jax server (same launch CLI and /generate JSON). On the JAX
accelerator suite: the same flow against the real sgl_jax server."""

import os

import pytest
import torch
from tiny_models import build_model, hf_greedy

from slime.rollout.engines.base import GenerateRequest, SamplingParams, WeightUpdateError
from slime.rollout.engines.sglang_jax.engine import (
    SGLangJaxEngine,
    SGLangJaxServerConfig,
    checkpoint_tensor_shapes,
    write_updated_checkpoint,
)
from slime.testing.ci_register import register_cpu_ci, register_tpu_ci

register_cpu_ci(est_time=40, suite="base-b-test-cpu")
register_tpu_ci(est_time=900, suite="base-b-test-tpu")

torch.set_num_threads(1)
PROMPT = [5, 6, 7, 8]


def greedy(n):
    return SamplingParams(temperature=0.0, max_new_tokens=n, ignore_eos=True)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    a = str(tmp_path_factory.mktemp("a"))
    b = str(tmp_path_factory.mktemp("b"))
    return {"a": (a, build_model("qwen3", a, with_tokenizer=True)), "b": (b, build_model("qwen3", b, seed=1))}


def test_write_updated_checkpoint_overlays_and_keeps_other_files(models, tmp_path):
    path_a, hf_a = models["a"]
    _, hf_b = models["b"]
    update = {"model.norm.weight": hf_b.state_dict()["model.norm.weight"]}
    out = write_updated_checkpoint(path_a, update, str(tmp_path / "v1"))
    assert sorted(os.listdir(out)) == sorted(f for f in os.listdir(path_a))
    from safetensors.torch import load_file

    written = load_file(os.path.join(out, "model.safetensors"))
    assert torch.equal(written["model.norm.weight"], update["model.norm.weight"])
    assert torch.equal(written["lm_head.weight"], hf_a.state_dict()["lm_head.weight"])
    assert checkpoint_tensor_shapes(out) == checkpoint_tensor_shapes(path_a)
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".writing-")]


def run_update_protocol(engine: SGLangJaxEngine, models):
    _, hf_a = models["a"]
    path_b, hf_b = models["b"]
    assert engine.generate([GenerateRequest("a", PROMPT, greedy(6))])[0].output_ids == hf_greedy(hf_a, PROMPT, 6)
    items = list(hf_b.state_dict().items())
    engine.update_weights_from_tensors(items[:7], version=1, finish=False)
    engine.update_weights_from_tensors(items[7:], version=1, finish=True)
    result = engine.generate([GenerateRequest("b", PROMPT, greedy(6))])[0]
    assert result.output_ids == hf_greedy(hf_b, PROMPT, 6) and result.weight_version == 1 and engine.weight_version == 1
    serving = engine.serving_path
    with pytest.raises(
        WeightUpdateError, match=r"'model.embed_tokens.weight' has shape \(1, 64\), the model expects \(320, 64\)"
    ):
        engine.update_weights_from_tensors([("model.embed_tokens.weight", torch.zeros(1, 64))], version=2)
    with pytest.raises(WeightUpdateError, match="unknown tensor name 'extra.weight'"):
        engine.update_weights_from_tensors([("extra.weight", torch.zeros(1))], version=2)
    assert engine.serving_path == serving and engine.weight_version == 1 and engine.health()
    engine.update_weights_from_disk(models["a"][0], version=3)
    assert engine.generate([GenerateRequest("c", PROMPT, greedy(6))])[0].output_ids == hf_greedy(hf_a, PROMPT, 6)


def test_reload_protocol_against_a_stand_in_server(models, tmp_path):
    config = SGLangJaxServerConfig(
        model_path=models["a"][0],
        staging_dir=str(tmp_path / "staging"),
        launch_module="slime.rollout.engines.embedded.server",
        startup_timeout_s=120,
        log_dir=str(tmp_path / "logs"),
        env={"OMP_NUM_THREADS": "1"},
    )
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in os.listdir(models["a"][0]):
        if name != "config.json":
            os.link(os.path.join(models["a"][0], name), broken / name)
    (broken / "config.json").write_text('{"model_type": "gpt2"}')
    with SGLangJaxEngine(config) as engine:
        run_update_protocol(engine, models)
        # A folder the server cannot start from: the old weights come back and keep serving.
        with pytest.raises(WeightUpdateError, match="(?s)reloading from .*broken failed; still serving"):
            engine.update_weights_from_disk(str(broken), version=9)
        assert engine.weight_version == 3 and engine.health()
        assert engine.generate([GenerateRequest("k", PROMPT, greedy(3))])[0].output_ids == hf_greedy(
            models["a"][1], PROMPT, 3
        )
    assert engine.server.process.poll() is not None


def test_real_sglang_jax_server(models, tmp_path):
    pytest.importorskip("sgl_jax", reason="sglang-jax is installed only in the JAX accelerator image")
    config = SGLangJaxServerConfig(
        model_path=models["a"][0], staging_dir=str(tmp_path / "staging"), log_dir=str(tmp_path / "logs")
    )
    with SGLangJaxEngine(config) as engine:
        run_update_protocol(engine, models)
