"""End to end on Ray with a tiny Qwen3-MoE (4 experts, top-2, hidden 32): two trainer processes with megatron's
--expert-model-parallel-size 2 (tokens cross ranks through the all-to-all dispatcher), the embedded engine serving
the same MoE, --ci-test (step-0 log-probs of trainer and engine agree), MoE metrics (aux load-balancing loss, router z-loss,
per-layer expert load imbalance) in metrics.jsonl, and --save-hf exporting back bit-exactly
(with --lr 0 the weights must come back as they went in, through the expert-parallel gather); the routing
mismatch count between engine and trainer (0 at equal weights); and --use-rollout-routing-replay through the loop."""

import math

import pytest
import torch

from slime.testing.ci_register import register_cpu_ci

register_cpu_ci(est_time=120, suite="base-c-test-cpu")

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
            # megatron's own MoE loss flags pass through; their values land in metrics.jsonl
            "moe-router-load-balancing-type": "aux_loss",
            "moe-aux-loss-coeff": 0.01,
            "moe-z-loss-coeff": 0.001,
            "save-hf": hf_out,
        },
    )
    steps = rows(out)
    assert [r["step"] for r in steps] == [0, 1]
    assert steps[0]["ci/logprob_abs_diff_mean"] < 1e-4 and steps[0]["ci/logprob_abs_diff_max"] < 1e-3
    assert all(math.isfinite(r["train/grad_norm"]) and r["train/grad_norm"] > 0 for r in steps)
    for r in steps:
        assert 0.5 < r["train/moe/load_balancing_loss"] < 4.0  # E * sum(f_e * p_e): 1 when balanced, <= E
        assert r["train/moe/z_loss"] > 0
        per_layer = [r[f"train/moe/load_imbalance_layer{i}"] for i in range(2)]
        assert all(1.0 <= v <= 4.0 for v in per_layer) and r["train/moe/load_imbalance"] == pytest.approx(
            sum(per_layer) / 2
        )
    assert all(r["train/moe/routing_mismatch_tokens"] == 0 for r in steps)  # same weights, same experts
    original = load_file(str(moe_files["model"] / "model.safetensors"))
    exported = load_file(str(hf_out / "model.safetensors"))
    assert sorted(exported) == sorted(original)
    assert any(".mlp.experts.3." in name for name in exported)  # the second expert rank's experts came back
    assert all(torch.equal(exported[name], original[name]) for name in original)


def test_rollout_routing_replay_through_the_loop(moe_files, tmp_path):
    out = tmp_path / "run"
    run(
        moe_files,
        out,
        **{
            "actor-num-gpus-per-node": 2,
            "expert-model-parallel-size": 2,
            "num-rollout": 2,
            "micro-batch-size": 4,
            "use-rollout-routing-replay": True,
            "ci-test": True,
        },
    )
    steps = rows(out)
    assert [r["step"] for r in steps] == [0, 1]
    assert steps[0]["ci/logprob_abs_diff_mean"] < 1e-4 and steps[0]["ci/logprob_abs_diff_max"] < 1e-3
    assert "train/moe/routing_mismatch_tokens" not in steps[0]  # replayed: the trainer routes as the engine did
    assert all(r["train/routing_replay/missing_tokens"] == 0 for r in steps)  # every token came with its routes
    assert all(r["train/routing_replay/replayed_tokens"] > 0 for r in steps)
    assert all(math.isfinite(r["train/grad_norm"]) and r["train/grad_norm"] > 0 for r in steps)
