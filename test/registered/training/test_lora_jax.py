"""LoRA on the JAX trainer (slime.training.jax.lora): the same adapters as the Megatron trainer (same start, same
steps, same merged weights), only adapter leaves trained (the base bit-identical after steps), log-probs with
loaded non-zero adapters equal transformers' on the merged model (and PEFT's when installed), --save-lora, a
resumed checkpoint, and a 4-device mesh (FSDP x TP) equal to one device."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from slime.testing.ci_register import register_cpu_ci

register_cpu_ci(est_time=60, suite="base-b-test-cpu")

pytest.importorskip("optax", reason="the JAX trainer needs jax and optax (pip install 'slime[test]')")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "models"))
sys.path.insert(0, str(HERE))

from test_jax_trainer import SETTINGS, _batch, _steps  # noqa: E402
from test_lora_megatron import hf_log_probs, random_adapters  # noqa: E402
from tiny_hf import init_rank, make_tiny_model, run_ranks  # noqa: E402

RANK, ALPHA = 4, 8.0


def spec(**overrides):
    from slime.models.lora import LoraSpec

    return LoraSpec(RANK, ALPHA, seed=5, **overrides)


def _jax_trainer(folder, devices=None, **overrides):
    import jax

    from slime.training.config import TrainerConfig
    from slime.training.jax.trainer import JaxPolicyTrainer

    config = TrainerConfig(hf_checkpoint=str(folder), **{"lora": spec(), **SETTINGS, **overrides})
    return JaxPolicyTrainer(config, devices or jax.devices()[:1])


def _megatron(rank, world, port, folder):
    from slime.training.actor import PolicyTrainer
    from slime.training.config import TrainerConfig

    backend, _ = init_rank(rank, world, port, 1)
    trainer = PolicyTrainer(TrainerConfig(hf_checkpoint=str(folder), lora=spec(), **SETTINGS), backend)
    return (*_steps(trainer, _batch()), dict(trainer.hf_adapter_tensors()))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    make_tiny_model("qwen2", folder, seed=5)
    return folder


def test_matches_the_megatron_trainer_and_trains_adapters_alone(model):
    import jax

    from slime.models.lora import is_adapter_name

    (mg_lp, mg_metrics, mg_params, mg_adapters), = run_ranks(_megatron, 1, model)  # fmt: skip
    trainer = _jax_trainer(model)
    base = jax.device_get(trainer.frozen)
    lp, metrics, params = _steps(trainer, _batch())
    assert len(trainer.params) == 28 and all(is_adapter_name(n) for n in trainer.params)
    assert sorted(trainer.opt_state[1].inner_state[0].mu) == sorted(trainer.params)  # moments: adapters only
    assert all(np.array_equal(v, base[n]) for n, v in jax.device_get(trainer.frozen).items())
    for a, b in zip(lp, mg_lp):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=0)
    for ours, theirs in zip(metrics, mg_metrics):
        for key in ("loss", "grad_norm", "pg_loss", "kl", "entropy", "lr"):
            if key in theirs:
                assert ours[key] == pytest.approx(theirs[key], rel=1e-4, abs=1e-6), key
    for name, value in mg_params.items():
        torch.testing.assert_close(params[name], value, atol=2e-5, rtol=1e-4)
    for name, value in trainer.hf_adapter_tensors():
        torch.testing.assert_close(value, mg_adapters[name], atol=2e-5, rtol=1e-4)
    assert metrics[-1]["grad_norm"] > 0


def test_zero_b_is_the_base_and_loaded_adapters_match_transformers_and_peft(model, tmp_path):
    import jax
    from transformers import AutoModelForCausalLM

    from slime.models.lora import merge_hf, read_peft
    from slime.types import Sample

    trainer = _jax_trainer(model)
    plain = _jax_trainer(model, lora=None)
    batch = _batch()
    for a, b in zip(trainer.compute_log_probs(batch)[0], plain.compute_log_probs(batch)[0]):
        assert torch.equal(a, b)
    adapters = random_adapters(model, seed=3)
    trainer.params = jax.device_put({n: t.numpy() for n, t in adapters.items()}, trainer.param_shardings)
    trainer.save_lora(tmp_path / "adapter")
    spec_read, read = read_peft(tmp_path / "adapter")
    assert spec_read.rank == RANK and all(torch.equal(read[n], t) for n, t in adapters.items())
    samples = [
        Sample(tokens=[int(t) for t in row], response_length=n) for row, n in zip(batch.tokens, batch.response_lengths)
    ]
    ours = trainer.compute_log_probs(batch)[0]
    hf = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32).eval()
    hf.load_state_dict(merge_hf(hf.state_dict(), adapters, ALPHA / RANK))
    for theirs, mine in zip(hf_log_probs(hf, samples), ours):
        torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=0)
    peft = pytest.importorskip("peft", reason="peft (the test extra) is not installed")
    base = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32)
    wrapped = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    for theirs, mine in zip(hf_log_probs(wrapped, samples), ours):
        torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=0)


def test_checkpoint_of_adapters_resumes_bit_identically(model, tmp_path):
    batch = _batch()
    trainer = _jax_trainer(model, lr_warmup_steps=0)
    trainer.snapshot("ref")
    batch.ref_log_probs, _ = trainer.compute_log_probs(batch, "ref")
    trainer.train_step(batch)
    trainer.save(tmp_path / "ckpt")
    with np.load(next((tmp_path / "ckpt").glob("step_*")) / "params.npz") as saved:
        assert len(saved.files) == 28  # the adapters, not the base
    expected = [trainer.train_step(batch) for _ in range(2)]
    resumed = _jax_trainer(model, lr_warmup_steps=0)
    resumed.load(tmp_path / "ckpt")
    assert [resumed.train_step(batch) for _ in range(2)] == expected


def _child(model_dir: str, out: str) -> None:
    import jax

    devices = jax.devices("cpu")
    results = {}
    for name, tp, use in (("one", 1, devices[:1]), ("fsdp2_tp2", 2, devices)):
        trainer = _jax_trainer(model_dir, use, tensor_parallel_size=tp, lr_warmup_steps=0, use_kl_loss=False)
        batch = _batch()
        metrics = [trainer.train_step(batch) for _ in range(2)]
        results[name] = {
            "loss": [m["loss"] for m in metrics],
            "adapters": {n: t.tolist() for n, t in trainer.hf_adapter_tensors()},
            "specs": {n: list(p.sharding.spec) for n, p in trainer.params.items()},
        }
    Path(out).write_text(json.dumps(results))


def test_four_device_mesh_equals_one_device(model, tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parents[2]), env.get("PYTHONPATH", "")])
    out = tmp_path / "mesh.json"
    done = subprocess.run([sys.executable, __file__, str(model), str(out)], env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    results = json.loads(out.read_text())
    one, mesh = results["one"], results["fsdp2_tp2"]
    assert mesh["loss"] == pytest.approx(one["loss"], rel=1e-5)
    for name, value in one["adapters"].items():
        np.testing.assert_allclose(mesh["adapters"][name], value, atol=1e-5, rtol=1e-4)
    q, o = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.o_proj"
    assert mesh["specs"][q + ".lora_B.weight"] == ["tensor", None] and mesh["specs"][q + ".lora_A.weight"] == [
        None,
        "fsdp",
    ]
    assert mesh["specs"][o + ".lora_A.weight"] == [None, "tensor"] and mesh["specs"][o + ".lora_B.weight"] == [
        "fsdp",
        None,
    ]


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2])


def test_an_adapter_peft_built_gives_the_jax_trainer_peft_log_probs(tmp_path):
    peft = pytest.importorskip("peft", reason="peft (the test extra) is not installed")
    import jax

    from slime.config_lora import LORA_TARGETS
    from slime.models.lora import read_peft
    from slime.types import Sample

    hf = make_tiny_model("qwen2", tmp_path / "model", seed=4)
    config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(LORA_TARGETS), init_lora_weights=False)
    wrapped = peft.get_peft_model(hf, config)
    with torch.no_grad():
        for name, param in wrapped.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.2)
    wrapped.save_pretrained(str(tmp_path / "adapter"))
    _, adapters = read_peft(tmp_path / "adapter")
    trainer = _jax_trainer(tmp_path / "model")
    trainer.params = jax.device_put({n: t.numpy() for n, t in adapters.items()}, trainer.param_shardings)
    batch = _batch()
    samples = [
        Sample(tokens=[int(t) for t in row], response_length=n) for row, n in zip(batch.tokens, batch.response_lengths)
    ]
    for mine, theirs in zip(trainer.compute_log_probs(batch)[0], hf_log_probs(wrapped.eval(), samples)):
        torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=0)
