"""Every numeric flag has its valid range declared beside it, and `slime train` refuses a value outside it before
anything starts: exit 2, one line naming the flag, the value and the range, Ray never imported. The flags are
read from the config's own sections, so a new numeric flag without a range, or one whose range is not enforced,
fails here. `--help` shows each range."""

import json
import subprocess
import sys
import typing
from dataclasses import fields
from pathlib import Path

import pytest

from slime.config import SECTIONS, _base_type, _flag, _megatron_fields, build_parser
from slime.flag_ranges import FINITE, MEGATRON_RANGES, Range, above, at_least, between, describe
from slime.testing.ci_register import register_cpu_ci

register_cpu_ci(est_time=12, suite="base-a-test-cpu")

ROOT = Path(__file__).resolve().parents[3]
BASE = ["--hf-checkpoint", "m", "--prompt-data", "p.jsonl", "--rm-type", "math"]


def numeric_fields() -> list[tuple[str, type, Range | None]]:
    """(flag, int or float, declared range) of every int and float flag the parser defines."""
    found = []
    for cls in SECTIONS.values():
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            base, _ = _base_type(hints[f.name])
            if base in (int, float):
                found.append((_flag(f), base, f.metadata.get("valid")))
    return found


def outside(valid: Range, kind: type) -> list:
    """Values just outside the range (and nan / inf for a float flag, which no range holds)."""
    values = []
    if valid.low is not None:
        value = valid.low if valid.low_open else valid.low - 1
        while any(value == allowed for allowed, _ in valid.special):
            value -= 1
        values.append(value)
    if valid.high is not None:
        values.append(valid.high if valid.high_open else valid.high + 1)
    if kind is float:
        values += [float("nan"), float("inf")]
    return values


def cases() -> list[tuple[str, str]]:
    """(flag, value) for every numeric flag, megatron's pass-through ones with a slime range included."""
    flags = [(flag, kind, valid) for flag, kind, valid in numeric_fields()]
    kinds = _megatron_fields()  # megatron's own type of each pass-through field
    flags += [("--" + key.replace("_", "-"), kinds[key], valid) for key, valid in MEGATRON_RANGES.items()]
    return [(flag, str(value)) for flag, kind, valid in flags for value in outside(valid, kind)]


def test_every_numeric_flag_declares_a_range():
    found = numeric_fields()
    assert len(found) >= 50
    assert [flag for flag, _, valid in found if valid is None] == []
    ints_without_bound = [flag for flag, kind, valid in found if kind is int and valid.low is None]
    assert ints_without_bound == []  # an int flag needs a bound to be refused at all


def test_ranges_refuse_what_they_should():
    assert describe("--lr", -1.0, at_least(0)) == "--lr must be >= 0, got -1"
    assert describe("--lr", 0.0, at_least(0)) is None
    assert describe("--x", 0.0, above(0)) == "--x must be > 0, got 0"
    assert describe("--p", 1.0, between(0, 1, low_open=True)) is None
    assert describe("--b", 1.0, between(0, 1, high_open=True)) == "--b must be in [0, 1), got 1"
    top_k = Range(1, special=((-1, "off"),))
    assert describe("--k", -1, top_k) is None and describe("--k", 0, top_k) == "--k must be -1 (off) or >= 1, got 0"
    assert describe("--r", float("nan"), FINITE) == "--r must be a finite number, got nan"
    assert describe("--r", float("-inf"), FINITE) == "--r must be a finite number, got -inf"
    assert describe("--r", -3.5, FINITE) is None


def test_help_shows_every_range():
    declared = {flag: valid for flag, _, valid in numeric_fields()}
    shown = {a.option_strings[0]: a.help for a in build_parser()._actions if a.option_strings}
    for flag, valid in declared.items():
        assert shown[flag].endswith(f"[valid: {valid}]"), flag


PROBE = """
import contextlib, io, json, sys
from slime import train_cli
base, cases = json.loads(sys.argv[1]), json.loads(sys.argv[2])
results = []
for flag, value in cases:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = train_cli.main(base + [flag, value])
    results.append([flag, value, code, err.getvalue()])
print(json.dumps({"results": results, "ray": "ray" in sys.modules}))
"""


def test_every_numeric_flag_out_of_range_is_one_line_exit_2_without_ray():
    walk = cases()
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(BASE), json.dumps(walk)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["ray"] is False
    ranges = {flag: valid for flag, _, valid in numeric_fields()}
    ranges |= {"--" + key.replace("_", "-"): valid for key, valid in MEGATRON_RANGES.items()}
    assert len(report["results"]) == len(walk) >= 100
    for flag, value, code, err in report["results"]:
        number = int(value) if value.lstrip("-").isdigit() else float(value)
        assert (code, err) == (2, f"error: {describe(flag, number, ranges[flag])}\n"), (flag, value)


@pytest.mark.parametrize("value", ["0", "-5"])
def test_a_value_inside_the_range_is_accepted(value):
    from slime.config import parse_config

    config = parse_config(BASE + ["--rollout-top-k", "-1", "--lr", "0", "--entropy-coef", value])
    assert config.algorithm.entropy_coef == float(value) and config.train.lr == 0.0
