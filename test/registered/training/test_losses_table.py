"""One table of closed-form RL-loss cases, run against both implementations: slime.training.losses (torch) and
slime.training.jax.losses (JAX). Each case gives the value and, where it matters, d(sum of output)/d(log_probs)."""

import math

import numpy as np
import pytest
import torch

from slime.testing.ci_register import register_cpu_ci
from slime.training import losses as torch_losses

register_cpu_ci(est_time=12, suite="base-a-test-cpu")

RATIO = [1.5, 0.5, 1.1, 3.0]
LOG_RATIO = [math.log(r) for r in RATIO]
ADV = [1.0, -1.0, 1.0, -1.0]
ONES4 = [[1.0] * 4]
GSPO_SEQ = math.exp((0.1 + 0.1 - 0.1) / 3)
LR = [0.5, -1.0]  # log-ratios of the KL cases: [-1, -2] against [-1.5, -1]

# (name, op, positional args (lists -> float32 arrays), keyword args, value, gradient w.r.t. args[0] or None)
CASES = [
    ("reduce_token", "reduce", [[[1.0, 3.0, 100.0], [5.0, 0.0, 0.0]], [[1, 1, 0], [1, 0, 0]]], {"mode": "token"},
     3.0, [[1 / 3, 1 / 3, 0.0], [1 / 3, 0.0, 0.0]]),
    ("reduce_sample", "reduce", [[[1.0, 3.0, 100.0], [5.0, 0.0, 0.0]], [[1, 1, 0], [1, 0, 0]]], {"mode": "sample"},
     3.5, [[0.25, 0.25, 0.0], [0.5, 0.0, 0.0]]),
    ("reduce_global_denominator", "reduce", [[[1.0, 3.0, 100.0], [5.0, 0.0, 0.0]], [[1, 1, 0], [1, 0, 0]]],
     {"mode": "token", "denominator": 9.0}, 1.0, None),
    ("ppo_clip", "policy_loss", [[LOG_RATIO], [[0.0] * 4], [ADV], ONES4], {"eps_clip": 0.2},
     (-1.2 + 0.8 - 1.1 + 3.0) / 4, [[0.0, 0.0, -1.1 / 4, 3.0 / 4]]),
    ("ppo_clip_higher", "policy_loss", [[LOG_RATIO], [[0.0] * 4], [ADV], ONES4], {"eps_clip": 0.2, "eps_clip_high": 0.28},
     (-1.28 + 0.8 - 1.1 + 3.0) / 4, None),
    ("ppo_dual_clip", "policy_loss", [[LOG_RATIO], [[0.0] * 4], [ADV], ONES4], {"eps_clip": 0.2, "eps_clip_c": 2.0},
     (-1.2 + 0.8 - 1.1 + 2.0) / 4, [[0.0, 0.0, -1.1 / 4, 0.0]]),
    ("ppo_on_policy_gradient", "policy_loss", [[[-1.0, -2.0]], [[-1.0, -2.0]], [[2.0, -1.0]], [[1.0, 1.0]]], {},
     -0.5, [[-1.0, 0.5]]),
    ("ppo_per_sample", "policy_loss", [[[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]], [[0.0] * 3, [0.0] * 3],
     [[1.0, 1.0, 1.0], [4.0, 4.0, 4.0]], [[1, 1, 1], [1, 0, 0]]], {"reduction": "sample"}, -2.5,
     [[-1 / 6, -1 / 6, -1 / 6], [-2.0, 0.0, 0.0]]),
    ("gspo_sequence_ratio", "policy_loss", [[[-1.0, -2.0, -3.0]], [[-1.1, -2.1, -2.9]], [[1.0] * 3], [[1.0] * 3]],
     {"eps_clip": 10.0, "ratio_type": "sequence"}, -GSPO_SEQ, [[-GSPO_SEQ / 3] * 3]),
    ("tis_weighted_loss", "policy_loss", [[[0.0, 0.0]], [[0.0, 0.0]], [[1.0, 1.0]], [[1.0, 1.0]]],
     {"importance_weights": [[2.0, 0.5]]}, -1.25, [[-1.0, -0.25]]),
    ("kl_k1", "kl_penalty", [[[-1.0, -2.0]], [[-1.5, -1.0]]], {"kind": "k1"}, [LR], [[1.0, 1.0]]),
    ("kl_k2", "kl_penalty", [[[-1.0, -2.0]], [[-1.5, -1.0]]], {"kind": "k2"}, [[0.125, 0.5]], [LR]),
    ("kl_k3", "kl_penalty", [[[-1.0, -2.0]], [[-1.5, -1.0]]], {"kind": "k3"},
     [[math.exp(-x) - 1 + x for x in LR]], [[1 - math.exp(-x) for x in LR]]),
    ("kl_low_var_clamped", "kl_penalty", [[[0.0, -1.0]], [[-20.0, -1.5]]], {"kind": "low_var_kl"},
     [[10.0, math.exp(-0.5) - 1 + 0.5]], [[0.0, 1 - math.exp(-0.5)]]),
    ("kl_explicit_clamp", "kl_penalty", [[[-1.0, -2.0]], [[-1.5, -1.0]]], {"kind": "k1", "clamp": 0.7}, [[0.5, -0.7]],
     None),
    ("entropy_bonus", "entropy_bonus", [[[1.0, 3.0, 9.0]], [[1, 1, 0]]], {}, 2.0, [[0.5, 0.5, 0.0]]),
    ("tis_weights", "truncated_importance_weights",
     [[[0.0, 0.0, 0.0]], [[0.0, math.log(4.0), -math.log(4.0)]], [[1, 1, 0]]], {"clip": 2.0}, [[1.0, 0.25, 0.0]],
     None),  # no gradient by construction (detached / stop_gradient)
    ("sft_nll", "sft_loss", [[[-1.0, -3.0, -7.0]], [[1, 1, 0]]], {}, 2.0, [[-0.5, -0.5, 0.0]]),
]  # fmt: skip


def _torch_run(op, args, kwargs, want_grad):
    tensors = [torch.tensor(a, dtype=torch.float32) for a in args]
    kwargs = {k: torch.tensor(v) if isinstance(v, list) else v for k, v in kwargs.items()}
    tensors[0].requires_grad_(want_grad)
    out = getattr(torch_losses, op)(*tensors, **kwargs)
    out = out[0] if isinstance(out, tuple) else out
    grad = None
    if want_grad:
        out.sum().backward()
        grad = tensors[0].grad.numpy()
    return out.detach().numpy(), grad


def _jax_run(op, args, kwargs, want_grad):
    jnp = pytest.importorskip("jax.numpy", reason="the JAX losses need jax (pip install 'slime[test]')")
    import jax

    from slime.training.jax import losses as jax_losses

    arrays = [jnp.asarray(a, jnp.float32) for a in args]
    kwargs = {k: jnp.asarray(v) if isinstance(v, list) else v for k, v in kwargs.items()}

    def run(first):
        out = getattr(jax_losses, op)(first, *arrays[1:], **kwargs)
        return out[0] if isinstance(out, tuple) else out

    grad = np.asarray(jax.grad(lambda x: run(x).sum())(arrays[0])) if want_grad else None
    return np.asarray(run(arrays[0])), grad


@pytest.mark.parametrize("implementation", ["torch", "jax"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_case(case, implementation):
    _, op, args, kwargs, value, grad = case
    run = _torch_run if implementation == "torch" else _jax_run
    got, got_grad = run(op, args, kwargs, grad is not None)
    np.testing.assert_allclose(got, np.asarray(value, np.float32), atol=1e-6, rtol=1e-6)
    if grad is not None:
        np.testing.assert_allclose(got_grad, np.asarray(grad, np.float32), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("implementation", ["torch", "jax"])
def test_bad_names_are_refused(implementation):
    if implementation == "jax":
        pytest.importorskip("jax", reason="the JAX losses need jax")
        from slime.training.jax import losses as module
    else:
        module = torch_losses
    x = [[1.0, 2.0]]
    array = torch.tensor(x) if implementation == "torch" else np.asarray(x, np.float32)
    with pytest.raises(ValueError, match="k1, k2, k3, low_var_kl"):
        module.kl_penalty(array, array, "k4")
    with pytest.raises(ValueError, match="not one of token, sample"):
        module.reduce(array, array, "seq")
