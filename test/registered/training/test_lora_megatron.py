"""LoRA on the Megatron trainer (slime.training.lora), under plain gloo launches: B = 0 leaves the model equal to
the base, only adapters train (no base gradients, no base optimizer state, base bit-identical after steps), the
merged weight is W + (alpha / r) B A in closed form, TP=2 equals TP=1 (the fused-QKV Qwen3 and the GQA Qwen2 with
biases), and a PEFT adapter written by --save-lora gives, in PEFT and in transformers, the trainer's log-probs."""

import sys
import tempfile
from pathlib import Path

import pytest
import torch

from slime.testing.ci_register import register_cpu_ci

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_trainer import local_batch, make_samples, trainer_config
from tiny_hf import init_rank, make_tiny_model, run_ranks

register_cpu_ci(est_time=100, suite="base-b-test-cpu")

RANK, ALPHA = 4, 8.0


def lora_spec(targets=None):
    from slime.models.lora import LORA_TARGETS, LoraSpec

    return LoraSpec(RANK, ALPHA, targets=targets or LORA_TARGETS, seed=5)


def random_adapters(folder, targets=None, seed=0) -> dict[str, torch.Tensor]:
    """Non-zero PEFT-named A and B for every adapted module of the model in `folder`."""
    from slime.models import bridge_class_for, load_hf_config
    from slime.models.lora import A_SUFFIX, B_SUFFIX, adapted_modules

    hf_config = load_hf_config(folder)
    shapes = bridge_class_for(hf_config)(hf_config).hf_shapes()
    g = torch.Generator().manual_seed(seed)
    out = {}
    for module in adapted_modules(lora_spec(targets), hf_config.num_hidden_layers):
        rows, cols = shapes[module + ".weight"]
        out[module + A_SUFFIX] = torch.randn(RANK, cols, generator=g) * 0.2
        out[module + B_SUFFIX] = torch.randn(rows, RANK, generator=g) * 0.2
    return out


def hf_base(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "model.safetensors"))


def lora_run(rank, world, port, folder, tp, adapters, steps, targets):
    """Log-probs of the base trainer and of LoRA before/after `steps` RL steps; adapters, merged weights."""
    from slime.training import lora
    from slime.training.actor import PolicyTrainer

    backend, layout = init_rank(rank, world, port, tp)
    batch = local_batch(layout)
    plain = PolicyTrainer(trainer_config(folder, tp), backend)
    base, _ = plain.compute_log_probs(batch)
    trainer = PolicyTrainer(trainer_config(folder, tp, lora=lora_spec(targets), lr_warmup_steps=0), backend)
    zero_b, _ = trainer.compute_log_probs(batch)
    if adapters is not None:
        lora.load_adapters(trainer.adapters, adapters, layout.tp_size, layout.tp_rank)
    frozen = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if not p.requires_grad}
    start, _ = trainer.compute_log_probs(batch)
    trainer.snapshot("ref")
    for _ in range(steps):
        batch.ref_log_probs, _ = trainer.compute_log_probs(batch, "ref")
        trainer.train_step(batch)
    trained = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    state_ids = {id(p) for p in trainer.optimizer.optimizer.state}
    final, _ = trainer.compute_log_probs(batch)
    refused = None
    if world == 1:  # one folder per process: a one-rank checkpoint
        with tempfile.TemporaryDirectory() as ckpt:
            trainer.save(ckpt)
            try:
                plain.load(ckpt)  # a LoRA checkpoint holds adapters alone: a plain trainer cannot resume from it
            except ValueError as e:
                refused = str(e)
    return {
        "refused": refused,
        "base": base, "zero_b": zero_b, "start": start, "final": final, "indices": batch.sample_indices,
        "trained": trained, "state_params": len(state_ids),
        "state_is_adapters": state_ids == {id(p) for p in trainer.model.parameters() if p.requires_grad},
        "base_grads": [n for n, p in trainer.model.named_parameters() if not p.requires_grad and p.grad is not None],
        "frozen_equal": all(torch.equal(p, dict(trainer.model.named_parameters())[n]) for n, p in frozen.items()),
        "adapters": dict(trainer.hf_adapter_tensors()), "merged": dict(trainer.hf_named_tensors()),
    }  # fmt: skip


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen3")
    make_tiny_model("qwen3", folder, seed=11, tokenizer=True)
    return folder


@pytest.fixture(scope="module")
def qwen3_tp1(qwen3):
    return run_ranks(lora_run, 1, str(qwen3), 1, random_adapters(qwen3), 3, None)[0]


def test_zero_b_equals_the_base_model_and_only_adapters_train(qwen3_tp1):
    r = qwen3_tp1
    assert all(torch.equal(a, b) for a, b in zip(r["base"], r["zero_b"]))
    assert not any(torch.allclose(a, b, atol=1e-4) for a, b in zip(r["base"], r["start"]))
    # 2 layers x (qkv: 3 targets, proj, fc1: 2, fc2) = 14 adapters, A and B each
    assert len(r["trained"]) == 28 and all(".lora." in n for n in r["trained"])
    assert r["state_params"] == 28 and r["state_is_adapters"]
    assert r["base_grads"] == [] and r["frozen_equal"]
    assert r["refused"].endswith("saved with --lora-rank 4, running with 0")
    assert not any(torch.allclose(a, b, atol=1e-4) for a, b in zip(r["start"], r["final"]))


def test_merged_weights_are_w_plus_scaled_b_a(qwen3, qwen3_tp1):
    from slime.models.lora import A_SUFFIX, B_SUFFIX

    base, r = hf_base(qwen3), qwen3_tp1
    adapted = 0
    for name, merged in r["merged"].items():
        module = name.removesuffix(".weight")
        if module + A_SUFFIX in r["adapters"]:
            a, b = r["adapters"][module + A_SUFFIX], r["adapters"][module + B_SUFFIX]
            torch.testing.assert_close(merged, base[name] + (ALPHA / RANK) * b @ a, atol=1e-6, rtol=0)
            adapted += 1
        else:
            assert torch.equal(merged, base[name]), name
    assert adapted == 14


def test_tp2_equals_tp1_for_fused_qkv_and_gqa_with_biases(qwen3, qwen3_tp1, tmp_path):
    qwen2 = tmp_path / "qwen2"
    make_tiny_model("qwen2", qwen2, seed=3)
    targets = ("q_proj", "v_proj", "down_proj", "up_proj")  # some pieces of each fused linear left out
    cases = [(qwen3, None, qwen3_tp1), (qwen2, targets, None)]
    for folder, chosen, tp1 in cases:
        adapters = random_adapters(folder, chosen)
        tp1 = tp1 or run_ranks(lora_run, 1, str(folder), 1, adapters, 3, chosen)[0]
        tp2 = run_ranks(lora_run, 2, str(folder), 2, adapters, 3, chosen)[0]
        for key in ("start", "final"):
            for ours, theirs in zip(tp2[key], tp1[key]):
                torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
        for name, tensor in tp1["adapters"].items():
            torch.testing.assert_close(tp2["adapters"][name], tensor, atol=1e-5, rtol=0)
        assert tp2["frozen_equal"] and tp2["base_grads"] == []


def peft_run(rank, world, port, folder, adapters_dir, out_dir):
    """Adapters read from a PEFT folder; log-probs before training, then after 2 steps with --save-lora."""
    from slime.models.lora import read_peft
    from slime.training import lora
    from slime.training.actor import PolicyTrainer

    backend, layout = init_rank(rank, world, port, 1)
    spec, adapters = read_peft(adapters_dir)
    trainer = PolicyTrainer(trainer_config(folder, 1, lora=spec, lr_warmup_steps=0, use_kl_loss=False), backend)
    lora.load_adapters(trainer.adapters, adapters, 1, 0)
    batch = local_batch(layout)
    loaded, _ = trainer.compute_log_probs(batch)
    for _ in range(2):
        trainer.train_step(batch)
    trainer.save_lora(out_dir)
    trained, _ = trainer.compute_log_probs(batch)
    return {"loaded": loaded, "trained": trained}


def hf_log_probs(model, samples=None) -> list[torch.Tensor]:
    """transformers' log-probs of each sample's response tokens (default: test_trainer's samples)."""
    out = []
    for sample in samples or make_samples():
        with torch.no_grad():
            logits = model(torch.tensor([sample.tokens])).logits[0].float()
        log_probs = torch.log_softmax(logits[:-1], dim=-1).gather(1, torch.tensor(sample.tokens[1:]).unsqueeze(1))[:, 0]
        out.append(log_probs[-sample.response_length :])
    return out


def write_adapters(folder, target):
    """A PEFT-format folder holding random_adapters (the layout PEFT's own save_pretrained writes)."""
    from slime.models.lora import write_peft

    write_peft(target, lora_spec(), random_adapters(folder, seed=7), folder)


def test_save_lora_loads_in_transformers_and_peft_with_the_trainer_log_probs(qwen3, tmp_path):
    from transformers import AutoModelForCausalLM

    from slime.models.lora import merge_hf, read_peft

    write_adapters(qwen3, tmp_path / "given")
    result = run_ranks(peft_run, 1, str(qwen3), str(tmp_path / "given"), str(tmp_path / "saved"))[0]
    for name, expected in (("given", result["loaded"]), ("saved", result["trained"])):
        spec, adapters = read_peft(tmp_path / name)
        model = AutoModelForCausalLM.from_pretrained(str(qwen3), dtype=torch.float32).eval()
        model.load_state_dict(merge_hf(model.state_dict(), adapters, spec.scaling))
        for ours, theirs in zip(hf_log_probs(model), expected):
            torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    assert not all(torch.allclose(a, b, atol=1e-4) for a, b in zip(result["loaded"], result["trained"]))
    peft = pytest.importorskip("peft", reason="peft (the test extra) is not installed")
    for name, expected in (("given", result["loaded"]), ("saved", result["trained"])):
        base = AutoModelForCausalLM.from_pretrained(str(qwen3), dtype=torch.float32)
        model = peft.PeftModel.from_pretrained(base, str(tmp_path / name)).eval()
        for ours, theirs in zip(hf_log_probs(model), expected):
            torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_moe_experts_are_refused_in_one_line():
    from slime.errors import FlagError
    from slime.models.lora import LoraSpec, check_targets

    with pytest.raises(FlagError, match="experts, which take no adapters"):
        check_targets(LoraSpec(4, 8.0), {"model_type": "qwen3_moe", "num_experts": 4})
    check_targets(LoraSpec(4, 8.0, targets=("q_proj", "o_proj")), {"model_type": "qwen3_moe", "num_experts": 4})


def test_embedded_engine_applies_adapter_updates_onto_its_base(qwen3):
    """Adapter-only sync: two updates in a row (the second replaces the first, not stacked), in two buckets."""
    from slime.models.lora import SCALING_NAME, merge_hf
    from slime.rollout.engines.base import WeightUpdateError
    from slime.rollout.engines.embedded import EmbeddedEngine

    engine = EmbeddedEngine(str(qwen3), max_batch_size=2, max_seq_len=32)
    base = {n: t.clone() for n, t in engine.named_weights().items()}
    scaling = torch.tensor([ALPHA / RANK])
    for version, seed in ((1, 1), (2, 2)):
        adapters = random_adapters(qwen3, seed=seed)
        items = [*adapters.items(), (SCALING_NAME, scaling)]
        engine.update_weights_from_tensors(items[:10], version=version, finish=False)
        engine.update_weights_from_tensors(items[10:], version=version, finish=True)
        expected = merge_hf(base, adapters, ALPHA / RANK)
        for name, tensor in engine.named_weights().items():
            torch.testing.assert_close(tensor, expected[name], atol=1e-6, rtol=0)
    bad = next(n for n in adapters if n.endswith("lora_A.weight"))
    with pytest.raises(WeightUpdateError, match="adapter"):
        engine.update_weights_from_tensors([(bad, torch.zeros(RANK, 3)), (SCALING_NAME, scaling)], version=3)


def bucket_run(rank, world, port, folder):
    from dataclasses import replace

    from slime.training.actor import PolicyTrainer

    backend, _ = init_rank(rank, world, port, 1)
    spec = replace(lora_spec(), sync="adapters")
    sizes = {}
    for name, lora in (("full", None), ("adapters", spec)):
        trainer = PolicyTrainer(trainer_config(folder, 1, lora=lora), backend)
        buckets = list(trainer.hf_weight_buckets(1 << 20))
        sizes[name] = (
            sum(t.numel() * t.element_size() for b in buckets for _, t in b),
            [n for b in buckets for n, _ in b],
        )
    return sizes


def test_adapter_sync_sends_the_adapters_and_the_scaling_alone(qwen3):
    from slime.models.lora import SCALING_NAME, is_adapter_name

    sizes = run_ranks(bucket_run, 1, str(qwen3))[0]
    full_bytes, _ = sizes["full"]
    adapter_bytes, names = sizes["adapters"]
    assert SCALING_NAME in names and all(is_adapter_name(n) for n in names) and len(names) == 29
    # rank 4 on a 64-wide, 2-layer model: (A + B) of 14 modules in float32, and the scaling
    per_layer = sum(
        RANK * (i + o) for i, o in ((64, 64), (64, 32), (64, 32), (64, 64), (64, 128), (64, 128), (128, 64))
    )
    assert adapter_bytes == 4 * (2 * per_layer + 1) and adapter_bytes < 0.2 * full_bytes


def peft_log_probs_run(rank, world, port, folder, adapters_dir):
    """The Megatron trainer's log-probs with the adapters of a folder PEFT itself wrote."""
    from slime.models.lora import read_peft
    from slime.training import lora
    from slime.training.actor import PolicyTrainer

    backend, layout = init_rank(rank, world, port, 1)
    spec, adapters = read_peft(adapters_dir)
    trainer = PolicyTrainer(trainer_config(folder, 1, lora=spec), backend)
    lora.load_adapters(trainer.adapters, adapters, 1, 0)
    return trainer.compute_log_probs(local_batch(layout))[0]


@pytest.mark.parametrize("family", ["qwen3", "qwen2"])  # q/k norms and tied embeddings; GQA with qkv biases
def test_an_adapter_peft_built_gives_the_trainer_peft_log_probs(family, tmp_path):
    peft = pytest.importorskip("peft", reason="peft (the test extra) is not installed")
    from slime.config_lora import LORA_TARGETS

    model = make_tiny_model(family, tmp_path / "model", seed=4)
    config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(LORA_TARGETS), init_lora_weights=False)
    wrapped = peft.get_peft_model(model, config)
    with torch.no_grad():  # both factors non-zero, B large enough to move the log-probs
        for name, param in wrapped.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.2)
    wrapped.save_pretrained(str(tmp_path / "adapter"))
    wrapped.eval()
    expected = hf_log_probs(wrapped)
    ours = run_ranks(peft_log_probs_run, 1, str(tmp_path / "model"), str(tmp_path / "adapter"))[0]
    for mine, theirs in zip(ours, expected):
        torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=0)


def moe_attention_run(rank, world, port, folder):
    from slime.training.actor import PolicyTrainer

    backend, layout = init_rank(rank, world, port, 1)
    batch = local_batch(layout)
    base = PolicyTrainer(trainer_config(folder, 1), backend).compute_log_probs(batch)[0]
    trainer = PolicyTrainer(trainer_config(folder, 1, lora=lora_spec(("q_proj", "v_proj", "o_proj"))), backend)
    start = trainer.compute_log_probs(batch)[0]
    trainer.snapshot("ref")
    batch.ref_log_probs, _ = trainer.compute_log_probs(batch, "ref")
    norms = [trainer.train_step(batch)["grad_norm"] for _ in range(2)]
    trained = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    return all(torch.equal(a, b) for a, b in zip(base, start)), norms, trained


def test_moe_attention_adapters_train_with_the_experts_frozen(tmp_path):
    make_tiny_model("qwen3_moe", tmp_path / "moe", seed=2)
    starts_at_base, norms, trained = run_ranks(moe_attention_run, 1, str(tmp_path / "moe"))[0]
    assert starts_at_base and norms[-1] > 0
    assert len(trained) == 12 and not any("mlp" in n for n in trained)  # 2 layers x (q, v: A and B; o: A and B)


def dropout_run(rank, world, port, folder):
    from slime.training.actor import PolicyTrainer
    from slime.training.lora import COLUMN

    backend, layout = init_rank(rank, world, port, world)
    batch = local_batch(layout)
    spec = lora_spec()
    trainer = PolicyTrainer(trainer_config(folder, world, lora=type(spec)(RANK, ALPHA, 0.3, spec.targets, 5)), backend)
    trainer.snapshot("ref")
    batch.ref_log_probs, _ = trainer.compute_log_probs(batch, "ref")
    first, _ = trainer.compute_log_probs(batch)
    again, _ = trainer.compute_log_probs(batch)
    for _ in range(2):
        trainer.train_step(batch)
    replicated = {}  # column-parallel A and row-parallel B: the same tensor on every TP rank
    for name, lin in trainer.adapters.items():
        for target in lin.targets:
            factor = lin.A[target] if lin.kind == COLUMN else lin.B[target]
            replicated[f"{name}.{target}"] = factor.detach().clone()
    return all(torch.equal(a, b) for a, b in zip(first, again)), replicated


def test_dropout_keeps_replicated_factors_equal_across_tensor_parallel_ranks(qwen3):
    (eval_same, rank0), (_, rank1) = run_ranks(dropout_run, 2, str(qwen3))
    assert eval_same  # log-probs are computed without dropout
    assert rank0.keys() == rank1.keys() and all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in rank0.items() if "linear_proj" in k)
