"""Vocabulary padding for tensor parallelism (--make-vocab-size-divisible-by): a model whose vocabulary TP=2
does not divide trains with padded embedding / output rows, yet its logits, log-probs and entropies equal
transformers' and its export is the checkpoint, bit for bit, without the padding."""

from pathlib import Path

import pytest
import torch
from tiny_hf import init_rank, make_tiny_model, run_ranks

from slime.testing.ci_register import register_cpu_ci

register_cpu_ci(est_time=50, suite="base-b-test-cpu")

ODD_VOCAB = 251
TEMPERATURE = 0.7


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

    from slime.kernels import get_op
    from slime.models import bridge_class_for, load_hf_config
    from slime.training.log_probs import vocab_parallel_log_probs_and_entropy

    backend, layout = init_rank(rank, world, port, tp=world)
    from megatron.core import parallel_state

    group = parallel_state.get_tensor_model_parallel_group()
    out = {}
    for name, folder in folders.items():
        config = load_hf_config(folder)
        bridge = bridge_class_for(config)(config, layout.tp_size, layout.tp_rank, make_vocab_size_divisible_by=multiple)
        model = bridge.build_model()
        bridge.load_hf(model, folder)
        ids = input_ids()
        with torch.no_grad():
            logits = model(ids, torch.arange(ids.shape[1]).expand_as(ids), None)
            local = logits.shape[-1]
            log_probs, entropy = vocab_parallel_log_probs_and_entropy(
                logits[:, :-1], ids[:, 1:], layout.tp_rank * local, group
            )
            trainer_op = get_op("vocab_parallel_logprobs_and_entropy", backend=backend)  # what the actor runs
            op_lp, op_entropy = trainer_op(
                logits[:, :-1].reshape(-1, local), ids[:, 1:].reshape(-1), group, temperature=TEMPERATURE
            )

        def gather(t):
            parts = [torch.empty_like(t) for _ in range(world)]
            torch.distributed.all_gather(parts, t.contiguous())
            return parts

        full_logits = torch.cat(gather(logits), dim=-1)
        exported = dict(bridge.export_hf(model, gather))
        original = load_file(str(Path(folder) / "model.safetensors"))
        exact = sorted(exported) == sorted(original) and all(torch.equal(exported[k], original[k]) for k in original)
        out[name] = (bridge.padded_vocab_size, full_logits, (log_probs, entropy), (op_lp, op_entropy), exact)
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
        for rank_result in results:
            size, logits, (log_probs, entropy), (op_lp, op_entropy), exact = rank_result[name]
            assert size == padded and logits.shape[-1] == padded
            assert exact, f"{name}: the export differs from the checkpoint (padding must not leave the trainer)"
            assert (logits[..., :ODD_VOCAB] - expected).abs().max().item() < 1e-5
            assert torch.all(logits[..., ODD_VOCAB:] == -1e4)
            for temperature, lp, ent in ((1.0, log_probs, entropy), (TEMPERATURE, op_lp, op_entropy)):
                want_lp, want_entropy = reference(expected, ids, temperature)
                assert (lp.reshape(want_lp.shape) - want_lp).abs().max().item() < 1e-5
                assert (ent.reshape(want_entropy.shape) - want_entropy).abs().max().item() < 1e-5


def reference(logits, ids, temperature):
    """transformers' next-token log-probs and entropies at a temperature."""
    log_softmax = torch.log_softmax(logits[:, :-1] / temperature, -1)
    entropy = -(log_softmax.exp() * log_softmax).sum(-1)
    return log_softmax.gather(-1, ids[:, 1:, None]).squeeze(-1), entropy
