"""HF <-> Megatron bridge: logits equal to transformers' (fp32, 1e-5) for Qwen2, Qwen3 and Llama at TP=1 and
TP=2 (two gloo processes), export -> HF tensors bit-exact, and one-line messages for bad input."""

import json
from pathlib import Path

import pytest
import torch
from tiny_hf import init_rank, make_tiny_model, run_ranks, tiny_config

from slime.testing.ci_register import register_cpu_ci

register_cpu_ci(est_time=50, suite="base-b-test-cpu")

FAMILIES = ("qwen3", "qwen2", "llama")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    folders = {}
    for family in FAMILIES:
        folders[family] = root / family
        make_tiny_model(family, folders[family], seed=3)
    folders["qwen3_untied"] = root / "qwen3_untied"
    make_tiny_model("qwen3", folders["qwen3_untied"], seed=4, tie=False)
    return folders


def input_ids():
    return torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(5))


def convert_and_run(rank, world, port, folders):
    from safetensors.torch import load_file

    from slime.models import bridge_class_for, load_hf_config

    _, layout = init_rank(rank, world, port, tp=world)
    out = {}
    for name, folder in folders.items():
        config = load_hf_config(folder)
        bridge = bridge_class_for(config)(config, layout.tp_size, layout.tp_rank)
        model = bridge.build_model()
        bridge.load_hf(model, folder)
        ids = input_ids()
        with torch.no_grad():
            logits = model(ids, torch.arange(ids.shape[1]).expand_as(ids), None)

        def gather(t):
            parts = [torch.empty_like(t) for _ in range(world)]
            torch.distributed.all_gather(parts, t.contiguous())
            return parts

        full_logits = torch.cat(gather(logits), dim=-1)
        exported = dict(bridge.export_hf(model, gather))
        original = load_file(str(Path(folder) / "model.safetensors"))
        exact = sorted(exported) == sorted(original) and all(torch.equal(exported[k], original[k]) for k in original)
        out[name] = (full_logits, exact)
    return out


@pytest.mark.parametrize("tp", [1, 2])
def test_logits_match_transformers_and_export_is_exact(checkpoints, tp):
    from transformers import AutoModelForCausalLM

    results = run_ranks(convert_and_run, tp, {k: str(v) for k, v in checkpoints.items()})
    for name, folder in checkpoints.items():
        hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
        with torch.no_grad():
            expected = hf(input_ids()).logits
        for rank_result in results:
            logits, exact = rank_result[name]
            assert exact, f"{name} TP={tp}: exported tensors differ from the checkpoint"
            diff = (logits - expected).abs().max().item()
            assert diff < 1e-5, f"{name} TP={tp}: max |logit diff| {diff}"


def test_unsupported_family_lists_supported_ones():
    from transformers import GPT2Config

    from slime.models import UnsupportedModel, bridge_class_for

    with pytest.raises(UnsupportedModel) as info:
        bridge_class_for(GPT2Config())
    assert (
        str(info.value)
        == "model_type 'gpt2' (GPT2Config) is not supported; supported families: llama, qwen2, qwen3, qwen3_moe"
    )


def test_tp_not_dividing_heads_gives_the_numbers():
    from slime.errors import FlagError
    from slime.models import bridge_class_for

    config = tiny_config("qwen3", num_attention_heads=6, num_key_value_heads=3)
    with pytest.raises(
        FlagError,
        match=r"^--tensor-model-parallel-size 2 must divide num_attention_heads=6 and num_key_value_heads=3 "
        r"of the qwen3 model$",
    ):
        bridge_class_for(config)(config, tensor_parallel_size=2)


def load_bad(rank, world, port, folder):
    from slime.models import CheckpointMismatch, bridge_class_for, load_hf_config

    init_rank(rank, world, port, tp=1)
    config = load_hf_config(folder)
    bridge = bridge_class_for(config)(config)
    try:
        bridge.load_hf(bridge.build_model(), folder)
    except CheckpointMismatch as e:
        return str(e)
    return None


def test_checkpoint_shape_mismatch_names_tensor_and_both_shapes(tmp_path):
    from safetensors.torch import load_file, save_file

    make_tiny_model("qwen2", tmp_path, seed=1)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    tensors["model.layers.1.mlp.up_proj.weight"] = torch.zeros(96, 64)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    message = run_ranks(load_bad, 1, str(tmp_path))[0]
    assert message == (
        f"{tmp_path / 'model.safetensors'}: tensor model.layers.1.mlp.up_proj.weight has shape (96, 64) "
        "but config.json implies (128, 64)"
    )
    assert "\n" not in message
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "qwen2"
