"""On a real (tiny, locally built) HF Qwen2 model: the chunked op, the fused hidden-state form, and the textbook
log_softmax + gather used before the switch give the same per-token log-probs and entropies for a response,
in fp32 and bf16, and the gradient reaching the model's parameters is the same.

Tolerances: fp32 2e-6 absolute (values ~ -5.5); bf16 model (bf16 logits, fp32 math in both): 2e-6 for the
logits forms; the fused form recomputes logits chunk by chunk with bf16 matmuls whose rounding can differ
from the whole-matrix matmul by one bf16 ulp of a logit, so 2e-2 there. Parameter gradients: 1e-5 relative.
"""

import pytest
import torch

from slime.backends import select_backend
from slime.kernels import get_op, naive_logprobs_and_entropy
from slime.testing.ci_register import register_cpu_ci

register_cpu_ci(est_time=13, suite="base-b-test-cpu")

torch.set_num_threads(1)
VOCAB, PROMPT, RESPONSE = 512, 5, 11


def tiny_qwen2(dtype):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return Qwen2ForCausalLM(config).to(dtype).eval()


def response_inputs():
    gen = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, VOCAB, (2, PROMPT + RESPONSE), generator=gen)
    return input_ids


def response_logits_and_hidden(model, input_ids):
    out = model(input_ids=input_ids, output_hidden_states=True)
    # position i predicts token i + 1; the response tokens are predicted from PROMPT - 1 onwards
    logits = out.logits[:, PROMPT - 1 : -1].reshape(-1, VOCAB)
    hidden = out.hidden_states[-1][:, PROMPT - 1 : -1].reshape(-1, model.config.hidden_size)
    targets = input_ids[:, PROMPT:].reshape(-1)
    return logits, hidden, targets


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.8])
def test_same_numbers_before_and_after_the_switch(dtype, temperature):
    model = tiny_qwen2(dtype)
    op = get_op("logprobs_and_entropy", backend=select_backend("cpu"))
    linear_op = get_op("linear_logprobs_and_entropy", backend=select_backend("cpu"))
    with torch.no_grad():
        logits, hidden, targets = response_logits_and_hidden(model, response_inputs())
        before = naive_logprobs_and_entropy(logits, targets, temperature)
        after = op(logits, targets, temperature, chunk_size=100)
        fused = linear_op(hidden, model.lm_head.weight, targets, temperature, chunk_size=100)
    assert before[0].shape == (2 * RESPONSE,)
    for got in (after, fused):
        tol = dict(atol=2e-6, rtol=1e-6) if got is after or dtype == torch.float32 else dict(atol=2e-2, rtol=1e-2)
        torch.testing.assert_close(got[0], before[0], **tol)
        torch.testing.assert_close(got[1], before[1], **tol)


def test_policy_gradient_reaching_the_model_is_the_same():
    input_ids = response_inputs()
    advantages = torch.linspace(-1, 1, 2 * RESPONSE)
    grads = {}
    for name in ("before", "after", "fused"):
        model = tiny_qwen2(torch.float32)
        logits, hidden, targets = response_logits_and_hidden(model, input_ids)
        if name == "before":
            log_probs, entropy = naive_logprobs_and_entropy(logits, targets)
        elif name == "after":
            log_probs, entropy = get_op("logprobs_and_entropy", impl="torch")(logits, targets, chunk_size=128)
        else:
            log_probs, entropy = get_op("linear_logprobs_and_entropy", impl="torch")(
                hidden, model.lm_head.weight, targets, chunk_size=128
            )
        loss = -(advantages * log_probs).mean() - 0.01 * entropy.mean()
        loss.backward()
        grads[name] = {n: p.grad.clone() for n, p in model.named_parameters()}
    for name in ("after", "fused"):
        for param, grad in grads["before"].items():
            torch.testing.assert_close(grads[name][param], grad, atol=1e-7, rtol=1e-5, msg=f"{name}: {param}")
