"""`--ci-test`: invariants a correct run holds, checked on real batches; a violation stops the run with the
numbers.

At the first RL step the trainer and the rollout engine hold the same weights, so
  * the trainer's log-probs of the sampled tokens equal the engine's (same distribution: softmax(logits / T)
    over the full vocabulary, see slime.rollout.engines.base) up to float error, and
  * KL(policy || reference) is 0 when the reference is the starting policy.
At every step log-probs are finite and <= 0, and entropies lie in [0, log V].
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# Mean |trainer - engine| log-prob per token at step 0, by engine dtype: fp32 agrees to ~1e-6 on CPU, half
# precision engines to ~1e-2.
LOGPROB_TOLERANCE = {"float32": 1e-3, "bfloat16": 5e-2, "float16": 3e-2}
KL_TOLERANCE = 1e-6
SLACK = 1e-4  # float slack on the range checks


class InvariantViolation(AssertionError):
    """A --ci-test invariant failed; the message has the measured numbers and the bound."""


def _masked(values: list[Tensor], masks: list[Tensor]) -> Tensor:
    return torch.cat([v.float()[m.bool()] for v, m in zip(values, masks)]) if values else torch.zeros(0)


def logprob_agreement(
    trainer_log_probs: list[Tensor], rollout_log_probs: list[Tensor | None], masks: list[Tensor]
) -> dict[str, float]:
    pairs = [(t, r, m) for t, r, m in zip(trainer_log_probs, rollout_log_probs, masks) if r is not None]
    if not pairs:
        return {}
    diff = _masked([(t.float() - r.float()).abs() for t, r, _ in pairs], [m for _, _, m in pairs])
    return {
        "ci/logprob_abs_diff_mean": float(diff.mean()) if diff.numel() else 0.0,
        "ci/logprob_abs_diff_max": float(diff.max()) if diff.numel() else 0.0,
    }


def check_first_step(metrics: dict[str, float], kl_to_ref: float | None, dtype: str, step: int = 0) -> None:
    """`dtype`: the lower of the engine's and the trainer's precisions, which sets the agreement bound."""
    bound = LOGPROB_TOLERANCE.get(dtype, 5e-2)
    mean = metrics.get("ci/logprob_abs_diff_mean")
    if mean is not None and not mean <= bound:
        raise InvariantViolation(
            f"--ci-test: at step {step} the trainer's log-probs differ from the rollout engine's by {mean:.3g} per token on "
            f"average (max {metrics['ci/logprob_abs_diff_max']:.3g}); expected <= {bound:g} at {dtype} precision"
        )
    if kl_to_ref is not None and not abs(kl_to_ref) <= KL_TOLERANCE:
        raise InvariantViolation(
            f"--ci-test: at step 0 KL(policy || reference) = {kl_to_ref:.3g}; expected |KL| <= {KL_TOLERANCE:g}"
        )


def check_ranges(
    log_probs: list[Tensor], entropies: list[Tensor], masks: list[Tensor], vocab_size: int
) -> dict[str, float]:
    lp, ent = _masked(log_probs, masks), _masked(entropies, masks)
    if lp.numel() == 0:
        return {}
    problems = []
    if not torch.isfinite(lp).all():
        problems.append(f"{int((~torch.isfinite(lp)).sum())} non-finite log-probs")
    elif float(lp.max()) > SLACK:
        problems.append(f"a log-prob of {float(lp.max()):.3g} > 0")
    high = math.log(vocab_size) + SLACK
    if ent.numel() and (not torch.isfinite(ent).all() or float(ent.min()) < -SLACK or float(ent.max()) > high):
        problems.append(
            f"entropies in [{float(ent.min()):.3g}, {float(ent.max()):.3g}], outside [0, log V = {high - SLACK:.3g}]"
        )
    if problems:
        raise InvariantViolation("--ci-test: " + "; ".join(problems))
    return {"ci/logprob_min": float(lp.min()), "ci/entropy_mean": float(ent.mean()) if ent.numel() else 0.0}
