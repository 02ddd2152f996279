"""One run of the real sglang-jax engine through slime's in-process adapter, in the TPU stack's environment with
JAX on the CPU: `python sglang_jax_scenario.py OUT.json MODEL_A [MODEL_B]`.

It generates greedily from MODEL_A (tokens and log-probs), checks pause / abort / continue, swaps MODEL_B's
weights in place (when given) and generates again; beside each generation it writes transformers' greedy tokens
and the JAX trainer's log-probs of the engine's tokens, for the test to compare. One process per run, ended
with os._exit: sglang-jax's scheduler and detokenizer are daemon threads without a stop, which abort the
interpreter's teardown.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time

PROMPTS = [[5, 6, 7, 8], [40, 41, 42], [3, 9, 27, 81, 243 % 200]]
NEW_TOKENS = 6


def hf_greedy(folder: str) -> list[list[int]]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    out = []
    for prompt in PROMPTS:
        ids = list(prompt)
        with torch.no_grad():
            for _ in range(NEW_TOKENS):
                ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
        out.append(ids[len(prompt) :])
    return out


def trainer_log_probs(folder: str, responses: list[list[int]]) -> list[list[float]]:
    """The JAX trainer's log-probs of each response after its prompt (what --ci-test compares at step 0)."""
    import jax

    from slime.training.batch import TrainBatch
    from slime.training.config import TrainerConfig
    from slime.training.jax.trainer import JaxPolicyTrainer
    from slime.types import Sample

    trainer = JaxPolicyTrainer(TrainerConfig(hf_checkpoint=folder), jax.devices())
    samples = [
        Sample(index=i, tokens=p + r, response_length=len(r), loss_mask=[1] * len(r))
        for i, (p, r) in enumerate(zip(PROMPTS, responses))
    ]
    log_probs, _ = trainer.compute_log_probs(TrainBatch.from_samples(samples, pad_token_id=0))
    return [[float(x) for x in row] for row in log_probs]


def generate(engine, tag: str) -> dict:
    from slime.rollout.engines.base import GenerateRequest, SamplingParams

    greedy = SamplingParams(temperature=0.0, max_new_tokens=NEW_TOKENS, ignore_eos=True)
    results = engine.generate(
        [GenerateRequest(f"{tag}{i}", p, greedy, return_logprob=True) for i, p in enumerate(PROMPTS)]
    )
    return {
        "tokens": [r.output_ids for r in results],
        "log_probs": [r.output_log_probs for r in results],
        "versions": [r.weight_version for r in results],
        "finish": [r.finish_reason for r in results],
    }


def pause_abort_continue(engine) -> dict:
    """A request submitted while paused waits; abort ends it as "abort"; after continue generation runs."""
    from slime.rollout.engines.base import GenerateRequest, SamplingParams

    done: dict[str, object] = {}
    engine.pause()
    request = GenerateRequest("held", PROMPTS[0], SamplingParams(temperature=0.0, max_new_tokens=2))
    engine.submit(request, lambda result: done.setdefault("held", result))
    time.sleep(1.0)
    waited = "held" not in done
    engine.abort("held")
    aborted = done.get("held")
    engine.resume()
    after = engine.generate([GenerateRequest("after", PROMPTS[1], SamplingParams(temperature=0.0, max_new_tokens=2))])
    return {
        "waited_while_paused": waited,
        "aborted": getattr(aborted, "finish_reason", None),
        "after_continue": after[0].finish_reason,
    }


def main(out: str, model_a: str, model_b: str | None) -> None:
    from slime.rollout.engines.sglang_jax.in_process import SGLangJaxInProcessEngine

    report: dict = {"threads_before": threading.active_count()}
    start = time.monotonic()
    engine = SGLangJaxInProcessEngine(model_a, context_length=64, dtype="float32", device="cpu",
                                      attention_backend="native", disable_precompile=True, mem_fraction_static=0.1)  # fmt: skip
    report["a"] = generate(engine, "a")
    report["a"]["hf"], report["a"]["trainer"] = hf_greedy(model_a), trainer_log_probs(model_a, report["a"]["tokens"])
    report["control"] = pause_abort_continue(engine)
    report["a_again"] = generate(engine, "r")  # in KV slots earlier requests used
    if model_b:
        from safetensors.torch import load_file

        engine.update_weights_from_tensors(list(load_file(f"{model_b}/model.safetensors").items()), version=1)
        report["b"] = generate(engine, "b")
        report["b"]["hf"], report["b"]["trainer"] = (
            hf_greedy(model_b),
            trainer_log_probs(model_b, report["b"]["tokens"]),
        )
    child = os.fork()  # a child of the host process, which the engine's shutdown must leave alone
    if child == 0:
        time.sleep(30)
        os._exit(0)
    engine.shutdown()
    report["child_alive_after_shutdown"] = os.waitpid(child, os.WNOHANG) == (0, 0)
    os.kill(child, 9)
    report["seconds"] = time.monotonic() - start
    with open(out, "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    try:
        main(sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else None)
    except BaseException:
        import traceback

        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    sys.stdout.flush()
    os._exit(0)
