"""Advantages and returns for a whole rollout batch, from its rewards and (as the estimator needs) the
reference / old log-probs and the critic's values. Pure: tensors in, tensors out, no model calls.

The batch is turned into right-padded [batch, longest response] tensors once, the estimator from
`advantages.py` runs on them, and the results go back as per-sample tensors of each response's length.
Group estimators (GRPO, GSPO, REINFORCE++-baseline) group samples by `group_ids`, so the batch order
does not matter.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from slime.training import advantages as adv
from slime.training.batch import TrainBatch, pad_rows, unpad_rows
from slime.training.losses import kl_penalty

GROUP_ESTIMATORS = ("grpo", "gspo", "reinforce_plus_plus_baseline")
TOKEN_ESTIMATORS = ("ppo", "reinforce_plus_plus")
ESTIMATORS = GROUP_ESTIMATORS + TOKEN_ESTIMATORS

# A custom estimator (--custom-advantage-function-path) has this signature and fills batch.advantages and
# batch.returns with per-sample tensors of each response's length.
AdvantageFn = Callable[["AdvantageSettings", TrainBatch, list[int]], None]


@dataclass(frozen=True)
class AdvantageSettings:
    estimator: str = "grpo"
    normalize_std: bool = True  # GRPO; False = Dr.GRPO
    gamma: float = 1.0
    lambd: float = 1.0
    kl_coef: float = 0.0  # KL as reward shaping (token estimators)
    kl_type: str = "k1"
    normalize_advantages: bool = False  # whiten over the batch afterwards

    def __post_init__(self) -> None:
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"advantage estimator {self.estimator!r} is not one of {', '.join(ESTIMATORS)}")
        if self.kl_coef and self.estimator in GROUP_ESTIMATORS:
            raise ValueError(
                f"--kl-coef (KL as reward shaping) needs a token-level estimator ({', '.join(TOKEN_ESTIMATORS)}); "
                f"with {self.estimator} use --use-kl-loss"
            )

    @property
    def needs_values(self) -> bool:
        return self.estimator == "ppo"

    @property
    def needs_ref(self) -> bool:
        return bool(self.kl_coef)


def padded(per_sample: list[Tensor], lengths: list[int]) -> Tensor:
    return pad_rows(per_sample, max(lengths))


def group_matrix(rewards: list[float], group_ids: list[int]) -> tuple[Tensor, list[list[int]]]:
    """Rewards as [num_groups, n] and, per group, the batch rows it came from (groups must have equal size)."""
    rows_of: dict[int, list[int]] = {}
    for row, gid in enumerate(group_ids):
        rows_of.setdefault(gid, []).append(row)
    groups = list(rows_of.values())
    sizes = {len(g) for g in groups}
    if len(sizes) != 1:
        raise ValueError(f"group estimators need groups of equal size; got sizes {sorted(sizes)}")
    return torch.tensor([[rewards[r] for r in g] for g in groups], dtype=torch.float32), groups


def compute_advantages(settings: AdvantageSettings, batch: TrainBatch, group_ids: list[int]) -> None:
    """Fill batch.advantages and batch.returns (per response token) for `settings.estimator`."""
    lengths = batch.response_lengths
    mask = padded(batch.loss_masks, lengths)
    if settings.estimator in GROUP_ESTIMATORS:
        matrix, groups = group_matrix(batch.rewards, group_ids)
        if settings.estimator == "reinforce_plus_plus_baseline":
            order = [row for g in groups for row in g]
            per_token = adv.reinforce_plus_plus_baseline_advantages(matrix, mask[order])
            token_adv = torch.zeros_like(mask)
            token_adv[order] = per_token
        else:
            scalars = adv.grpo_advantages(matrix, normalize_std=settings.normalize_std)
            per_row = torch.zeros(len(batch))
            for g, rows in enumerate(groups):
                per_row[rows] = scalars[g]
            token_adv = per_row.unsqueeze(1) * mask
        returns = token_adv
    else:
        final = torch.tensor(batch.rewards, dtype=torch.float32)
        kl = None
        if settings.kl_coef:
            if batch.ref_log_probs is None or batch.old_log_probs is None:
                raise ValueError("--kl-coef needs the reference and old log-probs of the batch")
            kl = kl_penalty(
                padded(batch.old_log_probs, lengths), padded(batch.ref_log_probs, lengths), settings.kl_type
            )
        if settings.estimator == "reinforce_plus_plus":
            token_adv = adv.reinforce_plus_plus_returns(final, mask, kl, settings.kl_coef, settings.gamma)
            returns = token_adv
        else:  # ppo
            if batch.values is None:
                raise ValueError("PPO advantages need the critic's values of the batch")
            rewards = adv.token_rewards(final, mask, kl, settings.kl_coef)
            token_adv, returns = adv.gae(rewards, padded(batch.values, lengths), settings.gamma, settings.lambd, mask)
    if settings.normalize_advantages:
        token_adv = adv.masked_whiten(token_adv, mask)
    batch.advantages = unpad_rows(token_adv, lengths)
    batch.returns = unpad_rows(returns, lengths)
