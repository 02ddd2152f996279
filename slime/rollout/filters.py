"""Dynamic sampling filters: `filter(args, group: list[Sample]) -> bool` (keep the group?)."""

from __future__ import annotations

from typing import Any

from slime.types import Sample


def check_reward_nonzero_std(args: Any, group: list[Sample]) -> bool:
    """Keep groups whose rewards differ: a group where every sample scored the same has zero GRPO advantage
    everywhere and contributes no gradient, only cost."""
    rewards = [s.scalar_reward(args.rollout.reward_key if args is not None else None) for s in group]
    return max(rewards) - min(rewards) > 1e-8


def keep_all(args: Any, group: list[Sample]) -> bool:
    return True
