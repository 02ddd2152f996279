"""Colocated hand-off from the JAX trainer's layout to the JAX engine without serialization: parameters sharded
over a 2-device mesh (tensor parallel, vocabulary rows padded to the TP degree), as the trainer holds them, go
into an engine serving on one of those devices with `update_weights_in_place`: no host copy, no HF renaming.
The engine then generates what transformers generates with the new weights.

The device count must be fixed before jax is imported, so the check runs in a child process (this file run as
a script)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from slime.testing.ci_register import register_cpu_ci

register_cpu_ci(est_time=30, suite="base-b-test-cpu")

HERE = Path(__file__).resolve().parent
PROMPTS = [[5, 17, 33, 2, 9], [40, 41]]


def hf_greedy(model, prompt, n):
    import torch

    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt) :]


def child(root: Path) -> None:
    import jax
    from tiny_models import build_model

    from slime.models import jax_dense
    from slime.rollout.engines.base import GenerateRequest, SamplingParams, WeightUpdateError
    from slime.rollout.engines.jax.engine import JaxEngine
    from slime.training.jax.sharding import make_mesh, param_shardings

    build_model("qwen3", str(root / "a"), seed=0, vocab_size=251)
    model_b = build_model("qwen3", str(root / "b"), seed=1, vocab_size=251)
    devices = jax.devices()
    assert len(devices) == 2
    mesh = make_mesh(devices, tensor=2)
    spec, shapes = jax_dense.spec_from_hf(root / "b", vocab_multiple=2)
    host, _ = jax_dense.load_hf_params(root / "b", spec, shapes)
    shardings = param_shardings(host, mesh)
    trainer_params = {name: jax.device_put(value, shardings[name]) for name, value in host.items()}
    assert trainer_params[jax_dense.EMBED].shape[0] == 252  # padded, as the trainer holds it
    assert len(trainer_params[jax_dense.EMBED].sharding.device_set) == 2

    greedy = SamplingParams(temperature=0.0, max_new_tokens=8, ignore_eos=True)
    with JaxEngine(str(root / "a"), max_batch_size=4, max_seq_len=32, device=devices[1]) as engine:
        broken = dict(trainer_params)
        broken["model.norm.weight"] = trainer_params["model.norm.weight"][:3]
        try:
            engine.update_weights_in_place(broken, version=9)
            raise AssertionError("a wrong shape was accepted")
        except WeightUpdateError as e:
            assert "model.norm.weight" in str(e) and engine.weight_version == 0
        engine.update_weights_in_place(trainer_params, version=4)
        assert all(v.devices() == {devices[1]} for v in engine.params.values())
        results = engine.generate([GenerateRequest(f"r{i}", p, greedy) for i, p in enumerate(PROMPTS)])
    assert [r.output_ids for r in results] == [hf_greedy(model_b, p, 8) for p in PROMPTS], results
    assert {r.weight_version for r in results} == {4}
    print("in-place hand-off ok")


def test_trainer_sharded_params_go_into_the_engine_device_to_device(tmp_path):
    pytest.importorskip("jax", reason="the JAX engine needs jax (pip install 'slime[test]')")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, __file__, str(tmp_path)], env=env, capture_output=True, text=True)
    assert done.returncode == 0 and "in-place hand-off ok" in done.stdout, done.stdout[-2000:] + done.stderr[-4000:]


if __name__ == "__main__":
    child(Path(sys.argv[1]))
