"""sglang-jax in this process (sglang_jax/in_process.py). On CPU: HF names map onto the state paths of
sglang-jax's dense models (embedding / scale / transposed kernels) and an update lands in a flax-nnx model laid
out like sglang-jax's, checked before anything is assigned. On the TPU suite (needs sglang-jax with a
single-process scheduler): greedy tokens equal transformers', before and after an in-process weight update."""

import numpy as np
import pytest
import torch
from tiny_models import build_model

from slime.rollout.engines.base import GenerateRequest, SamplingParams, WeightUpdateError
from slime.rollout.engines.sglang_jax.in_process import assign_hf_weights, rebind_state_leaves, state_path
from slime.testing.ci_register import register_cpu_ci, register_tpu_ci

register_cpu_ci(est_time=15, suite="base-b-test-cpu")
register_tpu_ci(est_time=600, suite="base-b-test-tpu")

PROMPTS = [[5, 6, 7, 8], [40, 41, 42]]


def test_state_paths_follow_sglang_jax_loaders():
    assert state_path("model.embed_tokens.weight") == ("model.embed_tokens.embedding", False)
    assert state_path("lm_head.weight") == ("lm_head.embedding", False)
    assert state_path("model.norm.weight") == ("model.norm.scale", False)
    assert state_path("model.layers.3.self_attn.k_norm.weight") == ("model.layers.3.self_attn.k_norm.scale", False)
    assert state_path("model.layers.0.mlp.down_proj.weight") == ("model.layers.0.mlp.down_proj.weight", True)
    assert state_path("model.layers.0.self_attn.q_proj.bias") == ("model.layers.0.self_attn.q_proj.bias", False)
    with pytest.raises(WeightUpdateError, match="no place in the sglang-jax model"):
        state_path("model.layers.0.mlp.experts.0.w1")


def _nnx_standin(hf):
    """sglang-jax's attribute layout (layers are a list) with flax-nnx Params holding zeroed JAX arrays in the
    (transposed) shapes its loaders store."""
    from types import SimpleNamespace

    import jax.numpy as jnp
    from flax import nnx

    root = SimpleNamespace()
    for name, tensor in hf.state_dict().items():
        path, transpose = state_path(name)
        node, parts = root, path.split(".")
        for part, following in zip(parts[:-1], parts[1:]):
            if part.isdigit():
                while len(node) <= int(part):
                    node.append(SimpleNamespace())
                node = node[int(part)]
            else:
                if not hasattr(node, part):
                    setattr(node, part, [] if following.isdigit() else SimpleNamespace())
                node = getattr(node, part)
        shape = tuple(tensor.shape[::-1]) if transpose else tuple(tensor.shape)
        setattr(node, parts[-1], nnx.Param(jnp.zeros(shape, jnp.float32)))
    return root


def test_update_lands_in_an_nnx_model_laid_out_like_sglang_jax(tmp_path):
    pytest.importorskip("flax", reason="the stand-in needs flax (pip install 'slime[test]')")
    hf = build_model("qwen2", str(tmp_path / "m"), seed=0)  # qwen2: q/k/v biases too
    model = _nnx_standin(hf)
    named = list(hf.state_dict().items())
    bad = named[:3] + [("model.layers.0.self_attn.k_proj.weight", torch.zeros(5, 64))]
    with pytest.raises(WeightUpdateError, match="k_proj.weight.*KV-head padding"):
        assign_hf_weights(model, bad)
    assert float(np.abs(np.asarray(model.model.embed_tokens.embedding.value)).sum()) == 0  # nothing assigned
    assert assign_hf_weights(model, named) == len(named)
    q = model.model.layers[1].self_attn.q_proj
    np.testing.assert_array_equal(
        np.asarray(q.weight.value), hf.model.layers[1].self_attn.q_proj.weight.detach().T.numpy()
    )
    np.testing.assert_array_equal(np.asarray(q.bias.value), hf.model.layers[1].self_attn.q_proj.bias.detach().numpy())
    np.testing.assert_array_equal(np.asarray(model.model.norm.scale.value), hf.model.norm.weight.detach().numpy())


def test_rebound_state_leaves_carry_an_assignment_into_what_the_jitted_calls_read():
    """sglang-jax's model runner calls its jitted model with `model_state_leaves` (flattened nnx state) on every
    call; an update rebinds that list, as tunix does, instead of recompiling."""
    pytest.importorskip("flax", reason="needs flax (pip install 'slime[test]')")
    from types import SimpleNamespace

    import jax
    import jax.numpy as jnp
    from flax import nnx

    class Norm(nnx.Module):
        def __init__(self):
            self.scale = nnx.Param(jnp.zeros(4))
            self.bias = nnx.Param(jnp.zeros(2))

    runner = SimpleNamespace(model=Norm())
    runner.model_state_leaves = jax.tree_util.tree_flatten(nnx.split(runner.model)[1])[0]
    before = list(runner.model_state_leaves)
    runner.model.scale.value = jnp.arange(4.0)
    rebind_state_leaves(runner)
    assert len(runner.model_state_leaves) == len(before) == 2
    assert sorted(float(leaf.sum()) for leaf in runner.model_state_leaves) == [0.0, 6.0]
    assert sorted(float(leaf.sum()) for leaf in before) == [0.0, 0.0]  # the old list is not changed in place


def test_real_sglang_jax_in_process_greedy_and_weight_update(tmp_path):
    pytest.importorskip("sgl_jax", reason="needs sglang-jax with a single-process scheduler (TPU suite)")
    from slime.rollout.engines.selection import installed_sglang_jax_sources, sglang_jax_in_process_problem

    problem = sglang_jax_in_process_problem(*installed_sglang_jax_sources())
    if problem:  # the [tpu] extra's 0.0.2: the run falls back to the restart adapter (test_sglang_jax.py)
        pytest.skip(f"in-process sglang-jax needs a newer sglang-jax: {problem}")
    from slime.rollout.engines.sglang_jax.in_process import SGLangJaxInProcessEngine

    a, b = build_model("qwen3", str(tmp_path / "a"), seed=0), build_model("qwen3", str(tmp_path / "b"), seed=1)

    def hf_greedy(model, prompt, n):
        ids = list(prompt)
        with torch.no_grad():
            for _ in range(n):
                ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
        return ids[len(prompt) :]

    greedy = SamplingParams(temperature=0.0, max_new_tokens=6, ignore_eos=True)
    engine = SGLangJaxInProcessEngine(str(tmp_path / "a"), context_length=64, dtype="float32")
    try:
        requests = [GenerateRequest(f"r{i}", p, greedy) for i, p in enumerate(PROMPTS)]
        assert [r.output_ids for r in engine.generate(requests)] == [hf_greedy(a, p, 6) for p in PROMPTS]
        engine.update_weights_from_tensors(list(b.state_dict().items()), version=1)
        after = engine.generate(requests)
        assert [r.output_ids for r in after] == [hf_greedy(b, p, 6) for p in PROMPTS]
        assert {r.weight_version for r in after} == {1}
    finally:
        engine.shutdown()
