"""The real sglang-jax engine (the pinned known-good commit) through slime's in-process adapter, in the TPU stack's
environment with JAX on the CPU: greedy tokens equal transformers', returned log-probs equal the JAX trainer's,
pause / abort / continue, an in-place weight swap whose next generation equals a fresh engine loaded with the
new weights, and a shutdown that leaves the host's other child processes alone. Each engine runs in its own
process (sglang_jax_scenario.py)."""

from slime.testing.ci_register import register_cpu_ci

register_cpu_ci(est_time=150, suite="base-c-test-tpu-stack-cpu")

import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from tiny_models import build_model  # noqa: E402

HERE = Path(__file__).parent
LOG_PROB_TOLERANCE = 1e-4


def scenario(tmp_path: Path, model_a: Path, model_b: Path | None = None) -> dict:
    out = tmp_path / f"{model_a.name}-{model_b.name if model_b else 'alone'}.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    argv = [sys.executable, str(HERE / "sglang_jax_scenario.py"), str(out), str(model_a)] + (
        [str(model_b)] if model_b else []
    )
    proc = subprocess.run(argv, cwd=HERE, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


def assert_agrees(run: dict, version: int) -> None:
    assert run["tokens"] == run["hf"], "sglang-jax's greedy tokens differ from transformers'"
    assert set(run["versions"]) == {version} and set(run["finish"]) == {"length"}
    for engine_row, trainer_row in zip(run["log_probs"], run["trainer"]):
        np.testing.assert_allclose(engine_row, trainer_row, atol=LOG_PROB_TOLERANCE, rtol=0)


def test_installed_sglang_jax_is_the_known_good_one():
    from slime.rollout.engines.selection import installed_sglang_jax_sources, sglang_jax_in_process_problem

    assert sglang_jax_in_process_problem(*installed_sglang_jax_sources()) is None


def test_qwen3_generates_like_transformers_and_swaps_weights_in_place(tmp_path):
    """head_dim 128 (sglang-jax's kernels need a multiple of 128), 2 KV heads for 4 query heads, untied head."""
    a, b = tmp_path / "qwen3-a", tmp_path / "qwen3-b"
    build_model("qwen3", str(a), seed=0, head_dim=128, num_key_value_heads=2, with_tokenizer=True)
    build_model("qwen3", str(b), seed=1, head_dim=128, num_key_value_heads=2, with_tokenizer=True)
    swapped = scenario(tmp_path, a, b)
    assert_agrees(swapped["a"], version=0)
    assert swapped["control"] == {"waited_while_paused": True, "aborted": "abort", "after_continue": "length"}
    assert swapped["a_again"]["tokens"] == swapped["a"]["tokens"], "requests in reused KV slots generate otherwise"
    assert_agrees(swapped["b"], version=1)
    assert swapped["b"]["tokens"] != swapped["a"]["tokens"]
    assert swapped["child_alive_after_shutdown"], "the engine's shutdown killed another child of its host process"
    fresh = scenario(tmp_path, b)["a"]  # a new engine started from the weights the swap put in
    assert fresh["tokens"] == swapped["b"]["tokens"]
    np.testing.assert_allclose(fresh["log_probs"], swapped["b"]["log_probs"], atol=1e-6, rtol=0)


def test_qwen2_with_biases_generates_like_transformers(tmp_path):
    a = tmp_path / "qwen2"
    build_model("qwen2", str(a), seed=2, hidden_size=256, num_attention_heads=2, num_key_value_heads=2,
                with_tokenizer=True)  # fmt: skip
    assert_agrees(scenario(tmp_path, a)["a"], version=0)


def test_models_it_cannot_serve_are_refused_in_one_line_before_it_starts(tmp_path):
    from slime.rollout.engines.base import EngineError
    from slime.rollout.engines.sglang_jax.in_process import SGLangJaxInProcessEngine

    build_model("qwen3", str(tmp_path / "small-heads"), seed=0)  # head_dim 16
    build_model("qwen2", str(tmp_path / "one-kv"), hidden_size=256, num_attention_heads=2, num_key_value_heads=1)
    with pytest.raises(EngineError, match=r"head_dim to be a multiple of 128, this model has 16; --rollout-engine jax"):
        SGLangJaxInProcessEngine(str(tmp_path / "small-heads"), context_length=64)
    with pytest.raises(EngineError, match="Qwen2 fails on a single KV head"):
        SGLangJaxInProcessEngine(str(tmp_path / "one-kv"), context_length=64)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
