"""Built-in rewards on hand-checked cases."""

import asyncio

import pytest

from slime.rollout import rm_hub
from slime.rollout.rm_hub.math_answers import final_answer, last_boxed, normalize_answer
from slime.testing.ci_register import register_cpu_ci
from slime.types import Sample

register_cpu_ci(est_time=4, suite="base-a-test-cpu")


def test_last_boxed_handles_nesting_and_picks_last():
    assert last_boxed(r"first \boxed{1} then \boxed{\frac{3}{4}} done") == r"\frac{3}{4}"
    assert last_boxed("no box") is None
    assert last_boxed(r"\boxed{unclosed") is None


@pytest.mark.parametrize(
    "raw, canonical",
    [
        ("0.5", "1/2"),
        (r"\frac{1}{2}", "1/2"),
        (r"\dfrac12", "1/2"),
        ("1/2", "1/2"),
        ("1,000", "1000"),
        ("$42$", "42"),
        ("42.", "42"),
        ("x = 7", "7"),
        (r"90^\circ", "90"),
        (r"\text{12 cm}", "12"),
        ("-3/6", "-1/2"),
        ("2.50", "5/2"),
        ("abc", "abc"),
    ],
)
def test_normalize_answer(raw, canonical):
    assert normalize_answer(raw) == canonical


def test_final_answer_fallbacks():
    assert final_answer("so the answer is 12.") == "12"
    assert final_answer("work\n#### 1,234") == "1,234"
    assert final_answer("Answer: 7") == "7"
    assert final_answer("nothing here") is None


def test_math_dapo_deepscaler():
    assert rm_hub.math_reward(r"thus \boxed{0.5}", "1/2") == 1.0
    assert rm_hub.math_reward(r"thus \boxed{0.6}", "1/2") == 0.0
    assert rm_hub.dapo_reward("reasoning...\nAnswer: 15", 15) == 1.0
    assert rm_hub.dapo_reward("reasoning without answer", 15) == -1.0
    assert rm_hub.deepscaler_reward(r"<think>\boxed{3}</think> so \boxed{4}", 4) == 1.0
    assert rm_hub.deepscaler_reward(r"<think>\boxed{4}</think> so \boxed{3}", 4) == 0.0
    assert rm_hub.deepscaler_reward(r"\boxed{4}", 4) == 0.0


def test_f1_squad_style():
    # prediction "the cat sat" -> [cat, sat]; truth "a cat sat down" -> [cat, sat, down]; P=1, R=2/3 -> F1=0.8
    assert rm_hub.f1_reward("The cat sat!", "a cat sat down") == pytest.approx(0.8)
    assert rm_hub.f1_reward("dog", ["cat", "dog"]) == 1.0
    assert rm_hub.f1_reward("dog", "cat") == 0.0


def test_gpqa_letter():
    assert rm_hub.gpqa_reward("Let me think. B seems wrong. The answer is (C).", "C") == 1.0
    assert rm_hub.gpqa_reward("The answer is C", "B") == 0.0
    assert rm_hub.gpqa_reward("I pick D", "D") == 1.0


def test_leading_number_is_the_plain_loops_reward():
    assert rm_hub.leading_number_reward("17", 17) == 1.0
    assert rm_hub.leading_number_reward(" 17+junk", "17") == 1.0  # what follows does not matter
    assert rm_hub.leading_number_reward("017", 17) == 0.0  # the digits as written, like the plain loop
    assert rm_hub.leading_number_reward("x17", 17) == rm_hub.leading_number_reward("", 17) == 0.0
    assert rm_hub.leading_number_reward("1", 17) == 0.0


def test_arithmetic():
    assert rm_hub.arithmetic_reward(" 57 ", 57) == 1.0
    assert rm_hub.arithmetic_reward("-3", -3) == 1.0
    assert rm_hub.arithmetic_reward("5 7", 57) == 0.0
    assert rm_hub.arithmetic_reward("57+", 57) == 0.0  # junk after a right answer is not rewarded
    assert rm_hub.arithmetic_reward("570", 57) == 0.0
    assert rm_hub.arithmetic_reward("", 1) == 0.0


def test_score_samples_custom_and_group():
    samples = [Sample(response="12", label=12), Sample(response="13", label=12)]

    async def per_sample(args, sample):
        return float(sample.response == str(sample.label))

    def per_group(args, group):
        return [i * 10.0 for i, _ in enumerate(group)]

    assert asyncio.run(rm_hub.score_samples(samples, rm_type=None, custom_rm=per_sample, group_rm=False)) == [1.0, 0.0]
    assert asyncio.run(rm_hub.score_samples(samples, rm_type=None, custom_rm=per_group, group_rm=True)) == [0.0, 10.0]
    assert asyncio.run(rm_hub.score_samples(samples, rm_type="arithmetic", custom_rm=None, group_rm=False)) == [
        1.0,
        0.0,
    ]
    with pytest.raises(ValueError, match="unknown --rm-type 'nope'"):
        asyncio.run(rm_hub.score_samples(samples, rm_type="nope", custom_rm=None, group_rm=False))
    with pytest.raises(ValueError, match="returned 1 rewards for 2 samples"):
        asyncio.run(rm_hub.score_samples(samples, rm_type=None, custom_rm=lambda a, g: [1.0], group_rm=True))
