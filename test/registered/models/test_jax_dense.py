"""The JAX dense models against transformers on awkward shapes, and HF load -> export bit-exactness."""

import numpy as np
import pytest
import torch

pytest.importorskip("jax", reason="the JAX models need jax (pip install 'slime[test]')")

from tiny_hf import make_tiny_model

from slime.models import jax_dense
from slime.testing.ci_register import register_cpu_ci

register_cpu_ci(est_time=25, suite="base-b-test-cpu")

CASES = {
    # odd vocab, untied, GQA 2:1
    "llama_odd_vocab": ("llama", False, dict(vocab_size=251)),
    # GQA 3:1 with non-zero qkv biases, hidden 60 / 6 heads = head_dim 10
    "qwen2_gqa3_bias": ("qwen2", False, dict(hidden_size=60, num_attention_heads=6, num_key_value_heads=2)),
    # 5 heads, MHA, tied
    "llama_5_heads_mha_tied": ("llama", True, dict(hidden_size=40, num_attention_heads=5, num_key_value_heads=5)),
    # q/k norm, head_dim 24 != hidden / heads, one KV head, odd vocab, tied
    "qwen3_hd24_one_kv": (
        "qwen3",
        True,
        dict(head_dim=24, num_attention_heads=4, num_key_value_heads=1, vocab_size=253),
    ),
    "qwen3_untied": ("qwen3", False, dict()),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def tiny(request, tmp_path_factory):
    family, tie, overrides = CASES[request.param]
    folder = tmp_path_factory.mktemp(request.param)
    model = make_tiny_model(family, folder, seed=3, tie=tie, **overrides)
    return folder, model


def test_logits_equal_transformers(tiny):
    folder, model = tiny
    spec, shapes = jax_dense.spec_from_hf(folder)
    params, _ = jax_dense.load_hf_params(folder, spec, shapes)
    ids = torch.randint(0, spec.vocab_size, (2, 13), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids).logits.numpy()
    got = np.asarray(jax_dense.forward(spec, params, ids.numpy()))
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


def test_padded_vocab_changes_nothing(tiny):
    folder, _ = tiny
    spec, shapes = jax_dense.spec_from_hf(folder)
    padded_spec, _ = jax_dense.spec_from_hf(folder, vocab_multiple=8 if spec.vocab_size % 8 else 7)
    assert padded_spec.padded_vocab > spec.vocab_size
    ids = np.arange(10, dtype=np.int32)[None] % spec.vocab_size
    plain = jax_dense.forward(spec, jax_dense.load_hf_params(folder, spec, shapes)[0], ids)
    padded = jax_dense.forward(padded_spec, jax_dense.load_hf_params(folder, padded_spec, shapes)[0], ids)
    np.testing.assert_array_equal(np.asarray(plain), np.asarray(padded))


def test_export_is_bit_exact(tiny, tmp_path):
    from safetensors.numpy import load_file

    from slime.training.checkpoint import write_hf_folder

    folder, _ = tiny
    spec, shapes = jax_dense.spec_from_hf(folder, vocab_multiple=4)
    params, dtypes = jax_dense.load_hf_params(folder, spec, shapes)
    out = write_hf_folder(tmp_path / "export", jax_dense.hf_tensors(params, spec, dtypes), folder)
    original, exported = load_file(str(folder / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert sorted(original) == sorted(exported)
    for name, value in original.items():
        assert value.dtype == exported[name].dtype and value.tobytes() == exported[name].tobytes(), name


def test_shape_mismatch_is_one_line(tiny, tmp_path):
    from slime.models.gpt_bridge import CheckpointMismatch

    folder, _ = tiny
    spec, shapes = jax_dense.spec_from_hf(folder)
    wrong = dict(shapes, **{"model.norm.weight": (3,)})
    with pytest.raises(CheckpointMismatch, match=r"model\.norm\.weight has shape"):
        jax_dense.load_hf_params(folder, spec, wrong)
