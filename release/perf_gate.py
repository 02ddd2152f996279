"""Nightly gates: is tonight's figure a regression, a noisy night, or fine? Small pure functions.

Each metric has a baseline (release/baselines/perf-<hw>.json: value and relative tolerance). Tonight's value
is compared with the baseline band and with the trailing mean of the last K nightly values (the history):

  * within the baseline band                                   -> "ok" (or "improved" beyond it, upward)
  * outside the band by more than twice the tolerance          -> "regression"  (too large to be noise)
  * outside the band, and the previous night was outside too   -> "regression"  (it persists)
  * outside the band once, previous night fine                 -> "noisy"       (reported, not failed)
  * inside the band but worse than the trailing mean by more
    than the tolerance                                          -> "drifting"    (reported, not failed)
  * no baseline yet                                             -> "new"

Exit codes of `python -m release perf gate`: 0 passed, 1 regression, 3 infrastructure failure (a benchmark
could not run), 4 crash (a benchmark failed). The worst one wins: crash > infra > regression.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from release.perf import Failure, MetricRecord

EXIT_OK, EXIT_REGRESSION, EXIT_INFRA, EXIT_CRASH = 0, 1, 3, 4
DEFAULT_TOLERANCE = 0.25
TRAILING_NIGHTS = 7
FAILING = ("regression",)


@dataclass(frozen=True)
class Baseline:
    value: float
    tolerance: float = DEFAULT_TOLERANCE  # relative, e.g. 0.25 = 25% worse still passes


@dataclass(frozen=True)
class Verdict:
    name: str
    status: str  # ok | improved | noisy | drifting | regression | new
    value: float
    baseline: Baseline | None
    trailing_mean: float | None
    reason: str

    @property
    def failed(self) -> bool:
        return self.status in FAILING


def worse_by(value: float, reference: float, higher_is_better: bool) -> float:
    """How much worse `value` is than `reference`, as a fraction of the reference (negative = better)."""
    if reference == 0:
        return 0.0 if value == reference else float("inf") if (value < 0) == higher_is_better else float("-inf")
    change = (value - reference) / abs(reference)
    return -change if higher_is_better else change


def trailing_mean(history: list[MetricRecord], name: str, nights: int = TRAILING_NIGHTS) -> float | None:
    values = [r.value for r in sorted((r for r in history if r.name == name), key=lambda r: r.date)][-nights:]
    return sum(values) / len(values) if values else None


def previous_value(history: list[MetricRecord], name: str, before_date: str) -> float | None:
    earlier = sorted((r for r in history if r.name == name and r.date < before_date), key=lambda r: r.date)
    return earlier[-1].value if earlier else None


def judge(record: MetricRecord, baseline: Baseline | None, history: list[MetricRecord]) -> Verdict:
    mean = trailing_mean([r for r in history if r.date < record.date], record.name)
    if baseline is None:
        return Verdict(record.name, "new", record.value, None, mean, "no baseline yet: add one to the baseline file")
    worse = worse_by(record.value, baseline.value, record.higher_is_better)
    tol = baseline.tolerance
    if worse > 2 * tol:
        return Verdict(
            record.name,
            "regression",
            record.value,
            baseline,
            mean,
            f"{worse:.0%} worse than the baseline {baseline.value:.4g} (band {tol:.0%}, more than twice the band)",
        )
    if worse > tol:
        previous = previous_value(history, record.name, record.date)
        if previous is not None and worse_by(previous, baseline.value, record.higher_is_better) > tol:
            return Verdict(
                record.name,
                "regression",
                record.value,
                baseline,
                mean,
                f"{worse:.0%} worse than the baseline {baseline.value:.4g} for a second night running",
            )
        return Verdict(
            record.name,
            "noisy",
            record.value,
            baseline,
            mean,
            f"{worse:.0%} worse than the baseline {baseline.value:.4g}, previous night within the band",
        )
    if mean is not None and worse_by(record.value, mean, record.higher_is_better) > tol:
        return Verdict(
            record.name,
            "drifting",
            record.value,
            baseline,
            mean,
            f"within the baseline band but {worse_by(record.value, mean, record.higher_is_better):.0%} worse than the "
            f"trailing mean {mean:.4g}",
        )
    if worse < -tol:
        return Verdict(
            record.name,
            "improved",
            record.value,
            baseline,
            mean,
            f"{-worse:.0%} better than the baseline: consider raising it",
        )
    return Verdict(record.name, "ok", record.value, baseline, mean, "")


def exit_code(verdicts: list[Verdict], failures: list[Failure]) -> int:
    if any(f.kind == "crash" for f in failures):
        return EXIT_CRASH
    if failures:
        return EXIT_INFRA
    return EXIT_REGRESSION if any(v.failed for v in verdicts) else EXIT_OK


def load_baselines(path: Path) -> dict[str, Baseline]:
    """{metric: {"value": v, "tolerance": t}} -> Baselines; errors name the file and the metric."""
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    out = {}
    for name, entry in data.get("metrics", {}).items():
        try:
            out[name] = Baseline(float(entry["value"]), float(entry.get("tolerance", DEFAULT_TOLERANCE)))
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path}: metric {name!r} needs a numeric 'value' (and optionally 'tolerance')") from None
    return out


def baselines_path(repo: Path, hardware: str) -> Path:
    return repo / "release" / "baselines" / f"perf-{hardware}.json"
