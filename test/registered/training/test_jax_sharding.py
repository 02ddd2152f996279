"""The JAX trainer on 4 virtual CPU devices equals the 1-device run: loss and gradients within 1e-5 relative,
parameters after three AdamW steps within 1e-4 relative; parameters and optimizer moments really are sharded
(FSDP over the data-parallel devices, Megatron-style over heads / MLP / a padded odd vocabulary for TP).

The device count must be fixed before jax is imported, so the measurements run in a child process
(this file run as a script) and the test compares what it writes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from slime.testing.ci_register import register_cpu_ci

register_cpu_ci(est_time=90, suite="base-b-test-cpu")

HERE = Path(__file__).resolve().parent
MESHES = {"fsdp4": 1, "fsdp2_tp2": 2, "tp4": 4}  # name -> tensor parallel size over 4 devices
STEPS = 3


def _batch():
    from slime.training.batch import TrainBatch
    from slime.types import Sample

    rng = np.random.default_rng(0)
    samples = [
        Sample(index=i, tokens=rng.integers(0, 253, size=9 + 2 * i).tolist(), response_length=3 + i,
               advantage=float(i % 3) - 1.0, rollout_log_probs=[-5.5] * (3 + i))
        for i in range(6)
    ]  # fmt: skip
    return TrainBatch.from_samples(samples, pad_token_id=0)


def _measure(trainer, batch) -> dict[str, np.ndarray]:
    import jax

    from slime.training.jax import step
    from slime.training.jax.trainer import LOG_PROB_CHUNK

    settings = step.LossSettings.of(trainer.config, LOG_PROB_CHUNK, False)
    grads, totals = trainer._accumulate("rl", batch, settings)
    vocab = trainer.spec.vocab_size  # rows past it are the padding of a vocabulary TP does not divide
    out = {"loss": np.asarray(totals["loss"])}
    out.update({f"grad/{n}": np.asarray(v)[:vocab] for n, v in jax.device_get(grads).items()})
    out["padding_grad_max"] = np.abs(np.asarray(grads["model.embed_tokens.weight"])[vocab:]).max(initial=0.0)
    for _ in range(STEPS):
        trainer.train_step(batch)
    out.update({f"param/{n}": np.asarray(v)[:vocab] for n, v in jax.device_get(trainer.params).items()})
    return out


def _child(model_dir: str, out_dir: str) -> None:
    import jax

    from slime.training.config import TrainerConfig
    from slime.training.jax.trainer import JaxPolicyTrainer

    devices = jax.devices("cpu")
    assert len(devices) == 4, devices
    batch = _batch()
    layouts = {}
    for name, tp in {"one": 1, **MESHES}.items():
        config = TrainerConfig(hf_checkpoint=model_dir, tensor_parallel_size=tp, lr=1e-3, entropy_coef=0.01,
                               use_tis=True, loss_reduction="sample")  # fmt: skip
        trainer = JaxPolicyTrainer(config, devices[:1] if name == "one" else devices)
        layouts[name] = {
            "mesh": dict(trainer.mesh.shape),
            "embed_rows": int(trainer.params["model.embed_tokens.weight"].shape[0]),
            "specs": {n: list(p.sharding.spec) for n, p in trainer.params.items()},
            "moment_specs": {n: list(p.sharding.spec) for n, p in trainer.opt_state[1].inner_state[0].mu.items()},
            "q_shard": list(trainer.params["model.layers.0.self_attn.q_proj.weight"].addressable_shards[0].data.shape),
        }
        np.savez(Path(out_dir) / f"{name}.npz", **_measure(trainer, batch))
    (Path(out_dir) / "layouts.json").write_text(json.dumps(layouts))


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    pytest.importorskip("optax", reason="the JAX trainer needs optax (pip install 'slime[test]')")
    sys.path.insert(0, str(HERE.parent / "models"))
    from tiny_hf import make_tiny_model

    root = tmp_path_factory.mktemp("sharding")
    make_tiny_model("qwen3", root / "model", seed=2, vocab_size=253)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parents[2]), env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, __file__, str(root / "model"), str(root)], env=env, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    layouts = json.loads((root / "layouts.json").read_text())
    return layouts, {name: dict(np.load(root / f"{name}.npz")) for name in ["one", *MESHES]}


def _relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


@pytest.mark.parametrize("mesh", sorted(MESHES))
def test_equals_one_device(results, mesh):
    _, values = results
    one, sharded = values["one"], values[mesh]
    assert sorted(one) == sorted(sharded)
    assert _relative(sharded["loss"], one["loss"]) <= 1e-5
    assert sharded["padding_grad_max"] == 0.0
    for name in one:
        bound = 1e-4 if name.startswith("param/") else 1e-5
        assert _relative(sharded[name], one[name]) <= bound, (name, _relative(sharded[name], one[name]))


def test_parameters_and_moments_are_sharded(results):
    layouts, _ = results
    norm = "model.norm.weight"
    assert layouts["fsdp4"]["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
    # q_proj [4 heads x 16, 64]: columns over fsdp, head rows over tensor
    assert {m: layouts[m]["q_shard"] for m in MESHES} == {"fsdp4": [64, 16], "fsdp2_tp2": [32, 32], "tp4": [16, 64]}
    assert layouts["fsdp2_tp2"]["specs"]["model.layers.0.mlp.down_proj.weight"] == ["fsdp", "tensor"]
    assert layouts["fsdp2_tp2"]["specs"][norm] == []
    for name in MESHES:
        assert layouts[name]["moment_specs"] == layouts[name]["specs"]
    # vocab 253 is padded to a multiple of the tensor-parallel size, not refused
    assert [layouts[m]["embed_rows"] for m in ("one", "fsdp4", "fsdp2_tp2", "tp4")] == [253, 253, 254, 256]


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2])
