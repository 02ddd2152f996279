"""The TPU path's loop on JAX's CPU backend with the real sglang-jax engine (its known-good commit, in the TPU stack's
environment): `--train-backend jax --rollout-engine sglang_jax`. Colocated, the engine lives in the trainer's
process and takes the trainer's parameters in place; step-0 trainer log-probs equal the engine's (--ci-test) and
each later rollout is served by the weights of the step before. --async, not colocated, generates one step behind
in its own engine worker; a resumed run reproduces the uninterrupted one."""

import pytest

from slime.testing.ci_register import register_cpu_ci

register_cpu_ci(est_time=180, suite="base-c-test-tpu-stack-cpu")

from loop_helpers import build_task, dumped, ray_cluster, rows, run, run_interrupted_and_resumed  # noqa: E402

# head_dim 128: sglang-jax's attention needs a multiple of 128; one trainer device keeps the JAX mesh small
SGLANG_JAX_PAIR = {"train-backend": "jax", "rollout-engine": "sglang_jax", "micro-batch-size": 8}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    ray = ray_cluster()
    yield build_task(tmp_path_factory.mktemp("task"), hidden_size=64, num_layers=2, head_dim=128)
    ray.shutdown()


def test_colocated_ci_test_with_the_engine_in_the_trainer_process(files, tmp_path, capfd):
    out, dumps = tmp_path / "run", tmp_path / "dumps"
    run(files, out, colocate=True, **{"ci-test": True, "save-debug-rollout-data": dumps, **SGLANG_JAX_PAIR})
    assert "sglang_jax engine(s) in the trainer process" in capfd.readouterr().err
    steps = rows(out)
    assert [r["step"] for r in steps] == [0, 1, 2]
    assert steps[0]["ci/logprob_abs_diff_mean"] < 1e-4 and steps[0]["ci/logprob_abs_diff_max"] < 1e-3
    assert all(r["train/grad_norm"] > 0 for r in steps)
    assert [r["weight_version"] for r in steps] == [1.0, 2.0, 3.0]
    assert [{s["weight_version"] for s in batch} for batch in dumped(dumps)] == [{0}, {1}, {2}]


def test_async_in_its_own_engine_worker_generates_one_step_behind(files, tmp_path):
    out, dumps = tmp_path / "run", tmp_path / "dumps"
    run(files, out, **{"async": True, "ci-test": True, "save-debug-rollout-data": dumps, **SGLANG_JAX_PAIR})
    assert [r["weight_version"] for r in rows(out)] == [1.0, 2.0, 3.0]
    assert [{s["weight_version"] for s in batch} for batch in dumped(dumps)] == [{0}, {0}, {1}]


def test_resume_reproduces_the_uninterrupted_run(files, tmp_path):
    common = {"num-rollout": 3, "save-interval": 1, "colocate": True, **SGLANG_JAX_PAIR}
    full, part = run_interrupted_and_resumed(files, tmp_path, **common)
    keys = ("rollout/reward_mean", "rollout/generated_tokens", "train/loss", "train/grad_norm", "weight_version")
    assert [r["step"] for r in rows(part)] == [0, 1, 2]
    assert {k: rows(full)[2][k] for k in keys} == {k: rows(part)[2][k] for k in keys}
