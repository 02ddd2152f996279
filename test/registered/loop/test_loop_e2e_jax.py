"""End to end on Ray with the JAX trainer (`--train-backend jax`) and the embedded engine: one process drives a
mesh over two virtual CPU devices (data parallel inside the mesh). Step-0 trainer log-probs equal the engine's
(--ci-test, colocated with the engine), --save-hf writes exactly the checkpointed parameters, --async runs one step behind, and a run
resumed from its checkpoint reproduces the uninterrupted one exactly."""

import json
import shutil

import numpy as np
import pytest

from slime.testing.ci_register import register_cpu_ci

register_cpu_ci(est_time=200, suite="base-c-test-cpu")

pytest.importorskip("optax", reason="the JAX trainer needs jax, flax and optax (pip install 'slime[test]')")

from loop_helpers import dumped, rows, run  # noqa: E402

JAX = {"train-backend": "jax", "actor-num-gpus-per-node": 2, "micro-batch-size": 8}
SAME = ("rollout/reward_mean", "rollout/generated_tokens", "train/loss", "train/pg_loss", "train/grad_norm",
        "train/entropy", "train/kl", "train/lr", "train/step", "weight_version")  # fmt: skip


def test_sync_colocated_ci_test_and_save_hf(files, tmp_path):
    from safetensors.numpy import load_file

    out, ckpt, hf = tmp_path / "run", tmp_path / "ckpt", tmp_path / "hf"
    run(files, out, save=ckpt, colocate=True, **{"save-hf": hf, "ci-test": True, "num-rollout": 2, **JAX})
    steps = rows(out)
    assert [r["step"] for r in steps] == [0, 1]
    assert steps[0]["ci/logprob_abs_diff_mean"] < 1e-4 and steps[0]["ci/logprob_abs_diff_max"] < 1e-3
    assert all(r["train/grad_norm"] > 0 for r in steps)
    assert [r["weight_version"] for r in steps] == [1.0, 2.0]
    assert json.loads((ckpt / "step_00000002" / "meta.json").read_text())["mesh"] == {"data": 1, "fsdp": 2, "tensor": 1}
    exported = load_file(str(hf / "model.safetensors"))
    with np.load(ckpt / "step_00000002" / "params.npz") as saved:
        assert sorted(exported) == sorted(saved.files)
        for name in saved.files:
            assert exported[name].tobytes() == saved[name].tobytes(), name
    original = load_file(str(files["model"] / "model.safetensors"))
    assert any(original[n].tobytes() != exported[n].tobytes() for n in original)  # it did train


def test_async_generates_one_step_behind(files, tmp_path):
    out, dumps = tmp_path / "run", tmp_path / "dumps"
    run(files, out, **{"async": True, "num-rollout": 3, "save-debug-rollout-data": dumps, **JAX})
    assert [r["weight_version"] for r in rows(out)] == [1.0, 2.0, 3.0]
    # rollout k+1 is generated while rollout k trains, by the weights from before that step
    assert [{s["weight_version"] for s in batch} for batch in dumped(dumps)] == [{0}, {0}, {1}]


def test_resume_is_bit_identical(files, tmp_path):
    common = {"num-rollout": 3, "use-kl-loss": True, "kl-loss-coef": 0.01, "save-interval": 1, **JAX}
    full = tmp_path / "full"
    run(files, full, save=tmp_path / "ckpt", **common)
    resumed_root, part = tmp_path / "resumed_ckpt", tmp_path / "part"
    shutil.copytree(tmp_path / "ckpt" / "step_00000002", resumed_root / "step_00000002")
    shutil.copytree(full, part)
    run(files, part, load=resumed_root, save=resumed_root, **common)
    full_rows, part_rows = rows(full), rows(part)
    assert [r["step"] for r in part_rows] == [0, 1, 2]
    assert {k: full_rows[2][k] for k in SAME} == {k: part_rows[2][k] for k in SAME}
    with (
        np.load(tmp_path / "ckpt" / "step_00000003" / "params.npz") as a,
        np.load(resumed_root / "step_00000003" / "params.npz") as b,
    ):
        assert sorted(a.files) == sorted(b.files)
        assert all(a[n].tobytes() == b[n].tobytes() for n in a.files)


def test_ppo_is_refused_in_one_line(files, tmp_path):
    from slime.config import ConfigError

    with pytest.raises(ConfigError, match="ppo needs a critic, which the jax trainer does not have yet"):
        run(files, tmp_path / "run", **{"advantage-estimator": "ppo", **JAX})
