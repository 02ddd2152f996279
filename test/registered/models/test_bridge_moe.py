"""Qwen3-MoE through the bridge: logits equal transformers' (fp32, 1e-5) at EP=1, EP=2 and TP=2 x EP=1 on gloo
(megatron's all-to-all dispatcher really exchanges tokens at EP=2), and export -> HF tensors bit-exact.
Variants cover norm_topk_prob on/off, tied/untied head, decoder_sparse_step and mlp_only_layers."""

from pathlib import Path

import pytest
import torch
from tiny_hf import init_rank, make_tiny_model, run_ranks

from slime.testing.ci_register import register_cpu_ci

register_cpu_ci(est_time=70, suite="base-b-test-cpu")

VARIANTS = {
    "topk_normed_untied": dict(seed=3),
    # layers 1 and 3 sparse by the step, layer 3 dense again by mlp_only_layers: only layer 1 has experts
    "topk_raw_tied_mixed": dict(
        seed=4, tie=True, norm_topk_prob=False, decoder_sparse_step=2, mlp_only_layers=[3], num_hidden_layers=4
    ),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_moe")
    folders = {}
    for name, options in VARIANTS.items():
        folders[name] = str(root / name)
        make_tiny_model("qwen3_moe", Path(folders[name]), **options)
    return folders


def input_ids():
    return torch.randint(0, 256, (2, 14), generator=torch.Generator().manual_seed(5))


def convert_and_run(rank, world, port, tp, ep, folders):
    from safetensors.torch import load_file

    from slime.models import bridge_class_for, load_hf_config

    _, layout = init_rank(rank, world, port, tp=tp, ep=ep)
    out = {}
    for name, folder in folders.items():
        config = load_hf_config(folder)
        bridge = bridge_class_for(config)(
            config,
            layout.tp_size,
            layout.tp_rank,
            expert_parallel_size=layout.ep_size,
            expert_parallel_rank=layout.ep_rank,
        )
        model = bridge.build_model().eval()  # megatron trains MoE x TP only with sequence parallelism
        bridge.load_hf(model, folder)
        ids = input_ids()[rank::world] if ep > 1 else input_ids()  # EP ranks are data-parallel: own rows
        with torch.no_grad():
            logits = model(ids, torch.arange(ids.shape[1]).expand_as(ids), None)

        def gather(t):
            parts = [torch.empty_like(t) for _ in range(world)]
            torch.distributed.all_gather(parts, t.contiguous())
            return parts

        full_logits = torch.cat(gather(logits), dim=-1) if tp > 1 else logits
        exported = dict(bridge.export_hf(model, gather, gather))
        original = load_file(str(Path(folder) / "model.safetensors"))
        exact = sorted(exported) == sorted(original) and all(torch.equal(exported[k], original[k]) for k in original)
        out[name] = (full_logits, exact)
    return out


@pytest.mark.parametrize("tp,ep", [(1, 1), (1, 2), (2, 1)])
def test_moe_logits_match_transformers_and_export_is_exact(checkpoints, tp, ep):
    from transformers import AutoModelForCausalLM

    world = tp * ep
    results = run_ranks(convert_and_run, world, tp, ep, checkpoints)
    for name, folder in checkpoints.items():
        hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        with torch.no_grad():
            expected = hf(input_ids()).logits
        for rank, rank_result in enumerate(results):
            logits, exact = rank_result[name]
            assert exact, f"{name} TP={tp} EP={ep}: exported tensors differ from the checkpoint"
            want = expected[rank::world] if ep > 1 else expected
            diff = (logits - want).abs().max().item()
            assert diff < 1e-5, f"{name} TP={tp} EP={ep}: max |logit diff| {diff}"


def test_expert_parallel_size_must_divide_experts(checkpoints):
    from slime.models import bridge_class_for, load_hf_config

    mixed = load_hf_config(checkpoints["topk_raw_tied_mixed"])
    assert bridge_class_for(mixed)(mixed).sparse_layers() == [False, True, False, False]
    config = load_hf_config(checkpoints["topk_normed_untied"])
    with pytest.raises(ValueError, match="expert_model_parallel_size=3 must divide num_experts=4"):
        bridge_class_for(config)(config, 1, 0, expert_parallel_size=3)


def test_expert_parallel_flag_passes_through_and_is_checked_at_parse_time(checkpoints, tmp_path):
    from slime.config import ConfigError, parse_config
    from slime.settings import trainer_config

    data = tmp_path / "p.jsonl"
    data.write_text('{"prompt": "1+1=", "label": "2"}\n')
    flags = ["--hf-checkpoint", checkpoints["topk_normed_untied"], "--prompt-data", str(data), "--rm-type", "math",
             "--expert-model-parallel-size", "2", "--global-batch-size", "4", "--rollout-batch-size", "4",
             "--micro-batch-size", "2"]  # fmt: skip
    with pytest.raises(ConfigError, match="--expert-model-parallel-size 2 must divide the data-parallel size 1"):
        parse_config(flags)
    config = parse_config(flags + ["--actor-num-gpus-per-node", "2"])
    assert trainer_config(config, "actor").expert_parallel_size == 2  # megatron's own flag, to init_distributed
