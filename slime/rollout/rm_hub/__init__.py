"""Built-in rewards (`--rm-type`) and the dispatch to custom reward functions (`--custom-rm-path`).

Every reward is a plain function of the response text and the label; the async wrappers below apply
them to Samples. Custom rewards are `async def reward(args, sample) -> float` or, with `--group-rm`,
`async def reward(args, samples) -> list[float]`.
"""

from __future__ import annotations

import asyncio
import inspect
import re
import string
from collections import Counter
from collections.abc import Callable
from typing import Any

from slime.errors import FlagError
from slime.rollout.rm_hub.math_answers import answers_match, final_answer
from slime.types import Sample


def math_reward(response: str, label: Any) -> float:
    """1 when the final (boxed, or 'answer is') answer equals the label after normalisation, else 0."""
    return 1.0 if answers_match(final_answer(response), label) else 0.0


def dapo_reward(response: str, label: Any) -> float:
    """DAPO-style: +1 correct, -1 otherwise (including no answer). The answer follows the last 'Answer:'."""
    matches = re.findall(r"Answer\s*:\s*([^\n]+)", response, flags=re.IGNORECASE)
    predicted = matches[-1].strip() if matches else final_answer(response)
    return 1.0 if answers_match(predicted, label) else -1.0


def deepscaler_reward(response: str, label: Any) -> float:
    """DeepScaleR-style: only the text after the closing </think> counts; no </think> -> 0."""
    if "</think>" not in response:
        return 0.0
    return math_reward(response.split("</think>")[-1], label)


def _squad_normalize(text: str) -> list[str]:
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return text.split()


def f1_reward(response: str, label: Any) -> float:
    """SQuAD token F1, max over the acceptable answers (label: str or list of str)."""
    answers = label if isinstance(label, (list, tuple)) else [label]
    predicted = _squad_normalize(response)
    best = 0.0
    for answer in answers:
        truth = _squad_normalize(str(answer))
        common = Counter(predicted) & Counter(truth)
        overlap = sum(common.values())
        if overlap == 0:
            continue
        precision, recall = overlap / len(predicted), overlap / len(truth)
        best = max(best, 2 * precision * recall / (precision + recall))
    return best


def gpqa_reward(response: str, label: Any) -> float:
    """Multiple choice: the last standalone letter A-D (after 'answer' if present) must equal the label letter."""
    tail = re.split(r"answer", response, flags=re.IGNORECASE)[-1]
    letters = re.findall(r"(?<![A-Za-z])\(?([A-D])\)?(?![A-Za-z])", tail)
    if not letters:
        letters = re.findall(r"(?<![A-Za-z])\(?([A-D])\)?(?![A-Za-z])", response)
    return 1.0 if letters and letters[-1] == str(label).strip().upper()[:1] else 0.0


def arithmetic_reward(response: str, label: Any) -> float:
    """The whole response (surrounding whitespace aside) is the integer answer (the quickstart task): 1 or 0.
    Anything after the number fails, so a policy cannot pad a right answer with junk and keep the reward."""
    text = response.strip()
    return 1.0 if re.fullmatch(r"-?\d+", text) is not None and int(text) == int(label) else 0.0


def leading_number_reward(response: str, label: Any) -> float:
    """The number the response starts with (leading whitespace aside) is the answer, whatever follows: 1 or 0
    (the reward of the plain reference loop in shared/baselines/plain_grpo.py, for side-by-side runs)."""
    found = re.match(r"\s*(\d+)", response)
    return 1.0 if found is not None and found.group(1) == str(label).strip() else 0.0


BUILTIN: dict[str, Callable[[str, Any], float]] = {
    "math": math_reward,
    "dapo": dapo_reward,
    "deepscaler": deepscaler_reward,
    "f1": f1_reward,
    "gpqa": gpqa_reward,
    "arithmetic": arithmetic_reward,
    "leading_number": leading_number_reward,
}


async def score_samples(
    samples: list[Sample],
    *,
    rm_type: str | None,
    custom_rm: Callable | None,
    group_rm: bool,
    args: Any = None,
    remote: Any = None,
) -> list[float | dict[str, float]]:
    """Rewards for samples (one group when group_rm). Custom beats rm_type when both are given."""
    if custom_rm is not None:
        if group_rm:
            rewards = custom_rm(args, samples)
            rewards = await rewards if inspect.isawaitable(rewards) else rewards
            if len(rewards) != len(samples):
                raise ValueError(f"group reward returned {len(rewards)} rewards for {len(samples)} samples")
            return list(rewards)
        results = [custom_rm(args, s) for s in samples]
        return [await r if inspect.isawaitable(r) else r for r in results]
    if rm_type == "remote_rm":
        return await asyncio.gather(*(remote.score(s) for s in samples))
    if rm_type not in BUILTIN:
        raise FlagError(f"unknown --rm-type {rm_type!r}; built in: {', '.join([*BUILTIN, 'remote_rm'])}")
    fn = BUILTIN[rm_type]
    return [fn(s.response, s.label) for s in samples]
