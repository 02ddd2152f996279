"""The embedded engine serves Qwen3-MoE (token-choice top-k, nothing dropped): prefill logits equal
transformers' on a mixed-length batch, greedy decoding equals HF's under continuous batching, and the per-token
expert choices it records equal HF's router's. Variants: norm_topk_prob on/off, a dense layer between sparse ones."""

import pytest
import torch
from tiny_models import build_model, hf_greedy

from slime.rollout.engines.base import GenerateRequest, SamplingParams
from slime.rollout.engines.embedded.engine import EmbeddedEngine
from slime.testing.ci_register import register_cpu_ci

register_cpu_ci(est_time=15, suite="base-b-test-cpu")

torch.set_num_threads(1)
VARIANTS = {
    "normed": dict(),
    "raw_mixed": dict(norm_topk_prob=False, decoder_sparse_step=2, num_hidden_layers=3, tie=True),
}
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [3] * 12, [40, 41, 42, 43], [7]]


@pytest.fixture(scope="module", params=list(VARIANTS))
def checkpoint(request, tmp_path_factory):
    path = str(tmp_path_factory.mktemp(request.param))
    # no EOS id: HF's min_new_tokens would mask it while the engine (ignore_eos) may pick it
    return path, build_model("qwen3_moe", path, seed=2, eos_token_id=None, **VARIANTS[request.param])


def test_prefill_logits_and_routing_equal_hf(checkpoint):
    path, hf = checkpoint
    eng = EmbeddedEngine(path, max_batch_size=len(PROMPTS), max_seq_len=64)
    try:
        width = max(map(len, PROMPTS))
        tokens = torch.zeros(len(PROMPTS), width, dtype=torch.long)
        for i, p in enumerate(PROMPTS):
            tokens[i, : len(p)] = torch.tensor(p)
        eng.model.routed_experts = []
        ours = eng.model.prefill(
            tokens, torch.tensor([len(p) for p in PROMPTS]), torch.arange(len(PROMPTS)), all_logits=True
        )
        routed = [r.view(len(PROMPTS), width, -1) for r in eng.model.routed_experts]
        eng.model.routed_experts = None
        for i, p in enumerate(PROMPTS):
            with torch.no_grad():
                out = hf(torch.tensor([p]), output_router_logits=True)
            assert (ours[i, : len(p)] - out.logits[0]).abs().max().item() < 1e-5
            assert len(routed) == len(out.router_logits) > 0
            for layer, logits in zip(routed, out.router_logits):
                hf_choice = torch.topk(logits.softmax(-1), hf.config.num_experts_per_tok, dim=-1).indices
                assert torch.equal(layer[i, : len(p)].sort(-1).values, hf_choice.sort(-1).values)
    finally:
        eng.shutdown()


def test_greedy_equals_hf_with_more_requests_than_slots(checkpoint):
    path, hf = checkpoint
    eng = EmbeddedEngine(path, max_batch_size=2, max_seq_len=64)
    try:
        budgets = [8, 3, 6, 1, 10]
        params = [SamplingParams(temperature=0.0, max_new_tokens=n, ignore_eos=True) for n in budgets]
        results = eng.generate([GenerateRequest(f"r{i}", p, s) for i, (p, s) in enumerate(zip(PROMPTS, params))])
        for p, n, result in zip(PROMPTS, budgets, results):
            assert result.output_ids == hf_greedy(hf, p, n)
    finally:
        eng.shutdown()


def test_routed_experts_over_http_equal_in_process(checkpoint):
    """The SGLang client asks the embedded server for return_routed_experts and decodes SGLang's base64 payload."""
    from slime.rollout.engines.embedded.server import serve_http
    from slime.rollout.engines.sglang.client import SGLangClient

    path, hf = checkpoint
    layers, top_k = hf.config.num_hidden_layers, hf.config.num_experts_per_tok
    dense = [i for i in range(layers) if (i + 1) % hf.config.decoder_sparse_step]  # no mlp_only_layers here
    eng = EmbeddedEngine(path, max_batch_size=2, max_seq_len=64)
    handle = serve_http(eng)
    try:
        params = SamplingParams(temperature=0.0, max_new_tokens=4, ignore_eos=True)
        requests = [GenerateRequest(f"h{i}", p, params, return_routed_experts=True) for i, p in enumerate(PROMPTS[:3])]
        local = eng.generate(requests)
        remote = SGLangClient(handle.url, timeout_s=60).generate(requests)
        for prompt, a, b in zip(PROMPTS, local, remote):
            assert a.routed_experts == b.routed_experts
            # SGLang's layout: [tokens - 1, num_hidden_layers, top_k], zeros in the dense layers
            routes = torch.tensor(a.routed_experts).view(len(prompt) + 4 - 1, layers, top_k)
            assert not routes[:, dense].any() and routes.max() > 0
        assert SGLangClient(handle.url).request("GET", "/get_server_info")["enable_return_routed_experts"] is True
        plain = eng.generate([GenerateRequest("p", PROMPTS[0], params)])[0]
        assert plain.routed_experts is None  # only when asked
    finally:
        handle.stop()
        eng.shutdown()
