"""Dynamic sampling filters: `filter(ctx: RolloutContext, group: list[Sample]) -> bool` (keep the group?)."""

from __future__ import annotations

from typing import Any

from slime.types import Sample


def check_reward_nonzero_std(ctx: Any, group: list[Sample]) -> bool:
    """Keep groups whose rewards differ: a group where every sample scored the same has zero GRPO advantage
    everywhere and contributes no gradient, only cost."""
    rewards = [s.scalar_reward(ctx.config.rollout.reward_key) for s in group]
    return max(rewards) - min(rewards) > 1e-8


def keep_all(ctx: Any, group: list[Sample]) -> bool:
    return True
