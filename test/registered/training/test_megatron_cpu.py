"""megatron-core on the CPU backend: the compatibility layer is applied only through the backend, is
idempotent, and a plain megatron GPTModel runs forward, backward and an optimizer step (random init and
dropout on, so the RNG tracker path runs too). A megatron-core upgrade that adds a CUDA-only call on this
path fails here."""

import subprocess
import sys
from pathlib import Path

import torch

from slime.testing.ci_register import register_cpu_ci

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
from tiny_hf import run_ranks

register_cpu_ci(est_time=32, suite="base-b-test-cpu")

REPO = Path(__file__).resolve().parents[3]


def test_importing_slime_does_not_patch_megatron():
    code = (
        "import slime, slime.models, slime.training.actor, slime.training.critic\n"
        "from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding\n"
        "from slime.backends.cpu import megatron_compat\n"
        "assert not megatron_compat.is_applied()\n"
        "assert RotaryEmbedding.get_emb.__module__.startswith('megatron'), RotaryEmbedding.get_emb.__module__\n"
        "print('clean')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("clean")


def train_plain_megatron(rank, world, port):
    import torch.nn.functional as F
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.optimizer.optimizer import FP32Optimizer
    from megatron.core.transformer import TransformerConfig

    from slime.backends import select_backend
    from slime.backends.cpu import megatron_compat
    from slime.training.distributed import init_distributed

    backend = select_backend("cpu")
    init_distributed(backend, rank, world, "127.0.0.1", port, tensor_parallel_size=world, seed=7)
    patched = RotaryEmbedding.get_emb
    backend.prepare_megatron()  # second application is a no-op
    assert megatron_compat.is_applied() and RotaryEmbedding.get_emb is patched

    config = TransformerConfig(
        num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4, num_query_groups=2,
        normalization="RMSNorm", gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
        qk_layernorm=True, hidden_dropout=0.1, attention_dropout=0.1, tensor_model_parallel_size=world,
        use_cpu_initialization=True, perform_initialization=True, bias_activation_fusion=False,
        masked_softmax_fusion=False, persist_layer_norm=False, bias_dropout_fusion=False, apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
    )  # fmt: skip
    model = GPTModel(config, get_gpt_layer_local_spec(qk_layernorm=True, normalization="RMSNorm"), vocab_size=64,
                     max_sequence_length=32, position_embedding_type="rope")  # fmt: skip
    optimizer = FP32Optimizer(
        torch.optim.AdamW(model.parameters(), lr=1e-2), OptimizerConfig(lr=1e-2, clip_grad=1.0), None
    )
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(16).expand(4, 16)
    losses, norms = [], []
    for _ in range(6):
        loss = model(ids[:, :-1], positions[:, :-1], None, labels=ids[:, 1:]).mean()
        loss.backward()
        ok, grad_norm, _ = optimizer.step()
        assert ok
        optimizer.zero_grad()
        losses.append(loss.item())
        norms.append(grad_norm)
    return losses, norms


def test_forward_backward_optimizer_step_tp1_and_tp2():
    for world in (1, 2):
        results = run_ranks(train_plain_megatron, world)
        losses, norms = results[0]
        assert losses[-1] < losses[0] - 0.1, losses
        assert all(n > 0 and n == n for n in norms)
        assert results[-1][0] == losses  # TP ranks agree on the loss
