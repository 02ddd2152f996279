"""End to end on Ray with a tiny Qwen3-MoE (4 experts, top-2, hidden 32): two trainer processes with megatron's
--expert-model-parallel-size 2 (tokens cross ranks through the all-to-all dispatcher), the embedded engine serving
the same MoE, --ci-test (step-0 log-probs of trainer and engine agree), and --save-hf exporting back bit-exactly
(with --lr 0 the weights must come back as they went in, through the expert-parallel gather)."""

import math

import pytest
import torch

from slime.testing.ci_register import register_cpu_ci

register_cpu_ci(est_time=90, suite="base-c-test-cpu")

from loop_helpers import build_task, ray_cluster, rows, run  # noqa: E402


@pytest.fixture(scope="module")
def moe_files(tmp_path_factory):
    ray = ray_cluster()
    yield build_task(tmp_path_factory.mktemp("moe_task"), experts=4)
    ray.shutdown()


def test_expert_parallel_training_passes_ci_checks_and_exports_exactly(moe_files, tmp_path):
    from safetensors.torch import load_file

    out, hf_out = tmp_path / "run", tmp_path / "hf"
    run(
        moe_files,
        out,
        **{
            "actor-num-gpus-per-node": 2,
            "expert-model-parallel-size": 2,
            "num-rollout": 2,
            "micro-batch-size": 4,
            "lr": 0.0,
            "ci-test": True,
            "save-hf": hf_out,
        },
    )
    steps = rows(out)
    assert [r["step"] for r in steps] == [0, 1]
    assert steps[0]["ci/logprob_abs_diff_mean"] < 1e-4 and steps[0]["ci/logprob_abs_diff_max"] < 1e-3
    assert all(math.isfinite(r["train/grad_norm"]) and r["train/grad_norm"] > 0 for r in steps)
    original = load_file(str(moe_files["model"] / "model.safetensors"))
    exported = load_file(str(hf_out / "model.safetensors"))
    assert sorted(exported) == sorted(original)
    assert any(".mlp.experts.3." in name for name in exported)  # the second expert rank's experts came back
    assert all(torch.equal(exported[name], original[name]) for name in original)
