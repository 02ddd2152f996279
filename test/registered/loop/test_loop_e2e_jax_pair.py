"""End to end on Ray with the all-JAX pair: `--train-backend jax --rollout-engine jax` (the TPU backend's loop,
run on host devices). Colocated, the engine runs inside the trainer's process and takes its parameters device to
device; step-0 trainer log-probs equal the engine's and later steps serve the trained weights (--ci-test); --async
generates one step behind with the weights the trainer sent, and an engine killed mid-rollout is restarted with
the newest weights, nothing lost or doubled."""

import pytest

from slime.testing.ci_register import register_cpu_ci

register_cpu_ci(est_time=200, suite="base-c-test-cpu")

pytest.importorskip("optax", reason="the JAX pair needs jax, flax and optax (pip install 'slime[test]')")

from loop_helpers import dumped, rows, run, run_interrupted_and_resumed  # noqa: E402

JAX_PAIR = {"train-backend": "jax", "rollout-engine": "jax", "actor-num-gpus-per-node": 2, "micro-batch-size": 8}


def test_sync_colocated_ci_test_with_the_engine_in_the_trainer_process(files, tmp_path, capfd):
    out, dumps = tmp_path / "run", tmp_path / "dumps"
    flags = {"ci-test": True, "num-rollout": 2, "save-debug-rollout-data": dumps, **JAX_PAIR}
    run(files, out, colocate=True, **flags)
    assert "1 jax engine(s) in the trainer process, colocated" in capfd.readouterr().err
    steps = rows(out)
    assert [r["step"] for r in steps] == [0, 1]
    assert steps[0]["ci/logprob_abs_diff_mean"] < 1e-4 and steps[0]["ci/logprob_abs_diff_max"] < 1e-3
    assert all(r["train/grad_norm"] > 0 for r in steps)
    assert [r["weight_version"] for r in steps] == [1.0, 2.0]
    # the second rollout was served by the weights handed over in process after the first step
    assert [{s["weight_version"] for s in batch} for batch in dumped(dumps)] == [{0}, {1}]


def test_async_generates_one_step_behind(files, tmp_path):
    out, dumps = tmp_path / "run", tmp_path / "dumps"
    run(files, out, **{"async": True, "ci-test": True, "num-rollout": 3, "save-debug-rollout-data": dumps, **JAX_PAIR})
    assert [r["weight_version"] for r in rows(out)] == [1.0, 2.0, 3.0]
    assert [{s["weight_version"] for s in batch} for batch in dumped(dumps)] == [{0}, {0}, {1}]


def test_engine_killed_mid_rollout_is_restarted_with_the_newest_weights(files, tmp_path):
    out, dumps = tmp_path / "run", tmp_path / "dumps"
    flags = {"custom-generate-function-path": "loop_plugins.generate_killing_the_engine_once"}
    run(files, out, **{**flags, "save-debug-rollout-data": dumps, "ci-test": True, **JAX_PAIR})
    steps = rows(out)
    assert [r["rollout/engine_restarts"] for r in steps] == [1.0, 0.0, 0.0]
    batches = dumped(dumps)
    assert sorted(s["index"] for b in batches for s in b) == list(range(48))
    assert [{s["weight_version"] for s in b} for b in batches] == [{0}, {1}, {2}]


def test_resume_reproduces_the_uninterrupted_run(files, tmp_path):
    common = {"num-rollout": 3, "save-interval": 1, **JAX_PAIR}
    full, part = run_interrupted_and_resumed(files, tmp_path, **common)
    keys = ("rollout/reward_mean", "rollout/generated_tokens", "train/loss", "train/grad_norm", "weight_version")
    assert [r["step"] for r in rows(part)] == [0, 1, 2]
    assert {k: rows(full)[2][k] for k in keys} == {k: rows(part)[2][k] for k in keys}
