"""End to end on Ray with LoRA (--lora-rank): the Megatron trainer with adapters, the embedded engine taking
adapter-only updates (it merges W0 + s B A itself) or merged weights, --ci-test's trainer/engine agreement at the
first step of a fresh and of a resumed run, resume equal to the uninterrupted run, checkpoints holding the
adapters alone, --save-lora (PEFT format) and --save-hf (merged) agreeing in closed form."""

import math

import pytest
import torch

from slime.testing.ci_register import register_cpu_ci

register_cpu_ci(est_time=110, suite="base-c-test-cpu")

from loop_helpers import rows, run, run_interrupted_and_resumed  # noqa: E402

LORA = {"lora-rank": 4, "lora-alpha": 8, "lr": 1e-2, "ci-test": True}


def test_adapter_sync_resume_and_exports(files, tmp_path):
    from safetensors.torch import load_file

    from slime.models.lora import merge_hf, read_peft

    common = {**LORA, "num-rollout": 3, "save-interval": 1}
    common |= {"save-lora": tmp_path / "adapter", "save-hf": tmp_path / "merged"}
    full, part = run_interrupted_and_resumed(files, tmp_path, **common)
    keys = ("rollout/reward_mean", "rollout/generated_tokens", "train/loss", "train/grad_norm", "weight_version")
    assert [r["step"] for r in rows(part)] == [0, 1, 2]
    assert {k: rows(full)[2][k] for k in keys} == {k: rows(part)[2][k] for k in keys}
    for out in (full, part):  # the first step of each run: the engine's log-probs are the trainer's
        first = [r for r in rows(out) if "ci/logprob_abs_diff_mean" in r][-1]
        assert first["ci/logprob_abs_diff_mean"] < 1e-4, first
    assert all(math.isfinite(r["train/grad_norm"]) and r["train/grad_norm"] > 0 for r in rows(full))

    state = torch.load(tmp_path / "resumed_ckpt" / "step_00000003" / "model_tp0.pt", weights_only=False)
    assert state["model"] and all(".lora." in name for name in state["model"])

    spec, adapters = read_peft(tmp_path / "adapter")
    assert (spec.rank, spec.alpha) == (4, 8.0) and len(adapters) == 2 * 7 * 2  # A and B, 7 modules, 2 layers
    assert any(float(t.abs().max()) > 0 for n, t in adapters.items() if "lora_B" in n)  # B moved from zero
    base = load_file(str(files["model"] / "model.safetensors"))
    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
    expected = merge_hf(base, adapters, spec.scaling)
    for name, tensor in merged.items():
        torch.testing.assert_close(tensor, expected[name], atol=1e-6, rtol=0)


def test_merged_sync_keeps_engine_and_trainer_together(files, tmp_path):
    out = tmp_path / "run"
    run(files, out, **LORA, **{"lora-sync": "merged", "num-rollout": 2, "lora-target-modules": ["q_proj", "v_proj"]})
    steps = rows(out)
    assert [r["step"] for r in steps] == [0, 1]
    assert steps[0]["ci/logprob_abs_diff_mean"] < 1e-4
    assert all(r["train/grad_norm"] > 0 for r in steps)


def test_jax_trainer_with_adapter_sync_resumes_exactly(files, tmp_path):
    pytest.importorskip("optax", reason="the JAX trainer needs jax and optax (pip install 'slime[test]')")
    from slime.models.lora import read_peft

    jax = {"train-backend": "jax", "actor-num-gpus-per-node": 2, "micro-batch-size": 8}
    common = {**LORA, **jax, "num-rollout": 3, "save-interval": 1, "save-lora": tmp_path / "adapter"}
    full, part = run_interrupted_and_resumed(files, tmp_path, **common)
    keys = ("rollout/reward_mean", "rollout/generated_tokens", "train/loss", "train/grad_norm", "weight_version")
    assert {k: rows(full)[2][k] for k in keys} == {k: rows(part)[2][k] for k in keys}
    for out in (full, part):
        first = [r for r in rows(out) if "ci/logprob_abs_diff_mean" in r][-1]
        assert first["ci/logprob_abs_diff_mean"] < 1e-4, first
    spec, adapters = read_peft(tmp_path / "adapter")
    assert spec.rank == 4 and len(adapters) == 28
