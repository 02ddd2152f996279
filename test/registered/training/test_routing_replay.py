"""Rollout routing replay on a tiny Qwen3-MoE: the embedded engine returns every token's experts (prompt
included, SGLang's shape); without replay the trainer's own routing agrees with the engine's on every token
(mismatch metric 0; corrupted engine routes count every token) and step-0 log-probs match; with replay the
routers take the engine's experts (the same log-probs with the true routes, different ones with corrupted
routes, which proves the replay is applied). Also: the HTTP encoding round-trips."""

import sys
from pathlib import Path

import pytest
import torch

from slime.testing.ci_register import register_cpu_ci

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
from tiny_hf import init_rank, make_tiny_model, run_ranks

register_cpu_ci(est_time=25, suite="base-b-test-cpu")

EXPERTS, TOP_K, LAYERS = 4, 2, 2


def rollout_samples(folder):
    from slime.rollout.engines.base import GenerateRequest, SamplingParams
    from slime.rollout.engines.embedded.engine import EmbeddedEngine
    from slime.types import Sample

    engine = EmbeddedEngine(folder, max_batch_size=2, max_seq_len=64, seed=0)
    prompts = [[5, 6, 7, 8, 9], [12, 13], [3, 4, 5, 6, 7, 8, 9, 10], [40, 41, 42]]
    params = SamplingParams(temperature=1.0, max_new_tokens=6, ignore_eos=True, seed=3)
    try:
        results = engine.generate(
            [GenerateRequest(f"r{i}", p, params, return_routed_experts=True) for i, p in enumerate(prompts)]
        )
    finally:
        engine.shutdown()
    samples = []
    for i, (prompt, result) in enumerate(zip(prompts, results)):
        sample = Sample(tokens=list(prompt), index=i, advantage=1.0 if i % 2 else -1.0)
        sample.append_response(result.output_ids, result.output_log_probs, trainable=True)
        sample.routed_experts = result.routed_experts
        samples.append(sample)
    return samples


def replay_run(rank, world, port, folder):
    from slime.training.actor import PolicyTrainer
    from slime.training.batch import TrainBatch
    from slime.training.config import TrainerConfig

    backend, _ = init_rank(rank, world, port, tp=1)
    samples = rollout_samples(folder)
    true_routes = [s.routed_experts for s in samples]
    corrupted = [[(e + 1) % EXPERTS for e in routes] for routes in true_routes]
    out = {"shapes": [(len(s.routed_experts), len(s.tokens)) for s in samples]}
    for replay in (False, True):
        trainer = PolicyTrainer(
            TrainerConfig(hf_checkpoint=folder, lr=1e-3, use_rollout_routing_replay=replay), backend
        )
        trainer.snapshot("start")
        for name, routes in (("true", true_routes), ("corrupted", corrupted)):
            for s, r in zip(samples, routes):
                s.routed_experts = r
            batch = TrainBatch.from_samples(samples, pad_token_id=0)
            log_probs, _ = trainer.compute_log_probs(batch)
            metrics = trainer.train_step(batch)
            with torch.no_grad():  # back to the start for the next case
                for n, p in trainer.model.named_parameters():
                    p.copy_(trainer._snapshots["start"][n])
            out[(replay, name)] = (log_probs, {k: v for k, v in metrics.items() if k.startswith("moe/")})
        out["rollout"] = [torch.tensor(s.rollout_log_probs) for s in samples]
    return out


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    folder = tmp_path_factory.mktemp("moe") / "model"
    make_tiny_model("qwen3_moe", folder, seed=11)
    return run_ranks(replay_run, 1, str(folder))[0]


def test_engine_reports_every_token_but_the_last(result):
    for routed, tokens in result["shapes"]:
        assert routed == (tokens - 1) * LAYERS * TOP_K


def test_without_replay_trainer_and_engine_route_alike(result):
    log_probs, metrics = result[(False, "true")]
    compared = sum(n // (LAYERS * TOP_K) for n, _ in result["shapes"])
    assert metrics["moe/routing_mismatch_tokens"] == 0 and metrics["moe/routing_mismatch_frac"] == 0
    for ours, engine in zip(log_probs, result["rollout"]):
        assert torch.allclose(ours, engine, atol=1e-5)
    _, bad = result[(False, "corrupted")]
    assert bad["moe/routing_mismatch_tokens"] == compared  # every reported token differs once shifted
    assert result[(False, "corrupted")][0][0].equal(log_probs[0])  # recording does not change the forward


def test_with_replay_the_routers_use_the_engine_experts(result):
    log_probs, metrics = result[(True, "true")]
    assert "moe/routing_mismatch_tokens" not in metrics
    for ours, engine in zip(log_probs, result["rollout"]):
        assert torch.allclose(ours, engine, atol=1e-5)
    replayed_bad, _ = result[(True, "corrupted")]
    assert not any(torch.allclose(a, b, atol=1e-3) for a, b in zip(replayed_bad, log_probs))


def test_routed_experts_round_trip_through_the_http_json():
    from slime.rollout.engines.base import GenerateResult
    from slime.rollout.engines.protocol import generate_response_json, parse_generate_request, parse_generate_response

    ids = [3, 0, 1, 2, 2, 3]
    body = generate_response_json(GenerateResult("r", [7], [-0.5], "length", prompt_tokens=3, routed_experts=ids))
    assert isinstance(body["meta_info"]["routed_experts"], str)
    assert parse_generate_response(body, "r").routed_experts == ids
    requests, _ = parse_generate_request(
        {"input_ids": [1, 2], "return_routed_experts": True}, lambda t: [], lambda: "x"
    )
    assert requests[0].return_routed_experts
