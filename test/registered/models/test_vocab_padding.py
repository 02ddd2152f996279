"""Vocabulary padding for tensor parallelism (--make-vocab-size-divisible-by): a model whose vocabulary TP=2
does not divide trains with padded embedding / output rows, yet its logits, log-probs and entropies equal
transformers' and its export is the checkpoint, bit for bit, without the padding."""

from pathlib import Path

import pytest
import torch
from tiny_hf import init_rank, make_tiny_model, run_ranks

from slime.testing.ci_register import register_cpu_ci

register_cpu_ci(est_time=45, suite="base-b-test-cpu")

ODD_VOCAB = 251


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("odd_vocab")
    make_tiny_model("qwen3", root / "tied", seed=7, vocab_size=ODD_VOCAB)
    make_tiny_model("qwen2", root / "untied", seed=8, vocab_size=ODD_VOCAB)
    return {"tied": root / "tied", "untied": root / "untied"}


def input_ids():
    return torch.randint(0, ODD_VOCAB, (2, 13), generator=torch.Generator().manual_seed(9))


def run_padded(rank, world, port, folders, multiple):
    from safetensors.torch import load_file

    from slime.models import bridge_class_for, load_hf_config
    from slime.training.log_probs import vocab_parallel_log_probs_and_entropy

    _, layout = init_rank(rank, world, port, tp=world)
    from megatron.core import parallel_state

    group = parallel_state.get_tensor_model_parallel_group()
    out = {}
    for name, folder in folders.items():
        config = load_hf_config(folder)
        bridge = bridge_class_for(config)(config, layout.tp_size, layout.tp_rank, multiple)
        model = bridge.build_model()
        bridge.load_hf(model, folder)
        ids = input_ids()
        with torch.no_grad():
            logits = model(ids, torch.arange(ids.shape[1]).expand_as(ids), None)
            local = logits.shape[-1]
            log_probs, entropy = vocab_parallel_log_probs_and_entropy(
                logits[:, :-1], ids[:, 1:], layout.tp_rank * local, group
            )

        def gather(t):
            parts = [torch.empty_like(t) for _ in range(world)]
            torch.distributed.all_gather(parts, t.contiguous())
            return parts

        full_logits = torch.cat(gather(logits), dim=-1)
        exported = dict(bridge.export_hf(model, gather))
        original = load_file(str(Path(folder) / "model.safetensors"))
        exact = sorted(exported) == sorted(original) and all(torch.equal(exported[k], original[k]) for k in original)
        out[name] = (bridge.padded_vocab_size, full_logits, log_probs, entropy, exact)
    return out


@pytest.mark.parametrize("multiple, padded", [(8, 256)])  # 251 -> a multiple of 8 * TP
def test_tp2_on_an_odd_vocabulary_matches_transformers(checkpoints, multiple, padded):
    from transformers import AutoModelForCausalLM

    results = run_ranks(run_padded, 2, {k: str(v) for k, v in checkpoints.items()}, multiple)
    for name, folder in checkpoints.items():
        hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
        ids = input_ids()
        with torch.no_grad():
            expected = hf(ids).logits
        expected_lp = torch.log_softmax(expected[:, :-1], -1)
        expected_entropy = -(expected_lp.exp() * expected_lp).sum(-1)
        expected_lp = expected_lp.gather(-1, ids[:, 1:, None]).squeeze(-1)
        for rank_result in results:
            size, logits, log_probs, entropy, exact = rank_result[name]
            assert size == padded and logits.shape[-1] == padded
            assert exact, f"{name}: the export differs from the checkpoint (padding must not leave the trainer)"
            assert (logits[..., :ODD_VOCAB] - expected).abs().max().item() < 1e-5
            assert torch.all(logits[..., ODD_VOCAB:] == -1e4)
            assert (log_probs - expected_lp).abs().max().item() < 1e-5
            assert (entropy - expected_entropy).abs().max().item() < 1e-5
