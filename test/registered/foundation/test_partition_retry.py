"""LPT partitioning and retry classification: small pure functions, checked by hand-worked cases."""

import random

import pytest

from slime.testing.ci_register import register_cpu_ci
from slime.testing.partition import balance, lpt_partition, shard_loads
from slime.testing.retry import FailureKind, classify_failure, should_retry

register_cpu_ci(est_time=5, suite="base-a-test-cpu")


def test_lpt_hand_worked():
    weights = {"a": 7, "b": 5, "c": 4, "d": 3, "e": 1}
    # heaviest first onto the lightest shard: a->0, b->1, c->1 (5<7), d->0 (7<9), e->1 (9<10)
    assert lpt_partition(weights, 2) == [["a", "d"], ["b", "c", "e"]]
    assert shard_loads(weights, lpt_partition(weights, 2)) == [10, 10]


def test_lpt_ties_break_by_name_and_index():
    weights = {"z": 1, "y": 1, "x": 1}
    assert lpt_partition(weights, 2) == [["x", "z"], ["y"]]


def test_lpt_deterministic_regardless_of_insertion_order():
    rng = random.Random(0)
    weights = {f"f{i}": rng.choice([5, 10, 30, 60, 300]) for i in range(200)}
    shuffled = dict(sorted(weights.items(), key=lambda kv: rng.random()))
    assert lpt_partition(weights, 7) == lpt_partition(shuffled, 7)
    shards = lpt_partition(weights, 7)
    assert sorted(n for s in shards for n in s) == sorted(weights)
    assert balance(weights, shards) < 1.05


def test_lpt_more_shards_than_items_and_bad_count():
    assert lpt_partition({"a": 1}, 3) == [["a"], [], []]
    with pytest.raises(ValueError):
        lpt_partition({"a": 1}, 0)


@pytest.mark.parametrize(
    "output, code, timed_out, kind",
    [
        ("E   ModuleNotFoundError: No module named 'foo'", 1, False, FailureKind.CODE_ERROR),
        ("  File 'x.py', line 3\nSyntaxError: invalid syntax", 1, False, FailureKind.CODE_ERROR),
        ("E   TypeError: f() takes 1 positional argument", 1, False, FailureKind.CODE_ERROR),
        ("E   AttributeError: 'X' object has no attribute 'y'", 1, False, FailureKind.CODE_ERROR),
        ("E   NameError: name 'q' is not defined", 1, False, FailureKind.CODE_ERROR),
        ("RuntimeError: CUDA out of memory. Tried to allocate", 1, False, FailureKind.CRASH),
        ("Fatal Python error: Segmentation fault", 139, False, FailureKind.CRASH),
        ("", -11, False, FailureKind.CRASH),
        ("E   AssertionError: accuracy 0.71 below threshold 0.80", 1, False, FailureKind.THRESHOLD),
        ("E   AssertionError: throughput 812 tokens/s below baseline", 1, False, FailureKind.THRESHOLD),
        ("E   AssertionError: assert 3 == 4", 1, False, FailureKind.UNKNOWN),
        ("OSError: [Errno 98] Address already in use", 1, False, FailureKind.INFRA),
        ("anything at all", None, True, FailureKind.TIMEOUT),
        # a code error wins over a threshold message in the same output: the code is broken
        ("E   AssertionError: accuracy low\nE   TypeError: bad", 1, False, FailureKind.CODE_ERROR),
    ],
)
def test_classify_failure(output, code, timed_out, kind):
    assert classify_failure(output, code, timed_out) is kind


def test_should_retry_only_retryable_and_within_budget():
    assert should_retry(FailureKind.THRESHOLD, 1, 3)
    assert should_retry(FailureKind.INFRA, 2, 3)
    assert not should_retry(FailureKind.THRESHOLD, 3, 3)
    for kind in (FailureKind.CODE_ERROR, FailureKind.CRASH, FailureKind.TIMEOUT, FailureKind.UNKNOWN):
        assert not should_retry(kind, 1, 5)
