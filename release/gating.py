"""CI decisions as plain functions: which jobs exist, whether a run goes ahead, when a job fast-fails,
when a stage may start, and what the finish job concludes. The workflows call these through
`python -m release ci ...`; test/registered/release/test_version_images_gating.py pins them down.
No third-party imports: the gate runs on a bare runner before anything is installed.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from slime.testing.partition import lpt_partition
from slime.testing.registry import Registration, suite_stage

CI_LABEL = "run-ci"  # a maintainer adds it to a PR to run the GPU and TPU stages
HARDWARE = ("cpu", "cuda", "rocm", "tpu")
ACCELERATORS = ("cuda", "rocm", "tpu")
STAGES = ("A", "B", "C")
# Seconds of estimated test time one shard should carry, and the most shards a job may fan out to.
SHARD_TARGET_S = {"cpu": 900.0, "cuda": 1200.0, "rocm": 1200.0, "tpu": 1200.0}
MAX_SHARDS = 8
# Paths whose change alone never needs tests.
DOC_ONLY = re.compile(r"(^docs/|\.md$|^LICENSE$|^\.gitignore$)")
BAD_CONCLUSIONS = ("failure", "cancelled", "timed_out", "startup_failure")


@dataclass(frozen=True)
class SuiteJob:
    """One workflow job: a stage's suite on one hardware target, fanned out over `shards` matrix entries."""

    stage: str  # "A", "B", "C" or "nightly"
    hw: str
    suite: str
    target: str  # the suite's last part: "cpu", "1-gpu", "2-gpu", "tpu", "1-amd"
    shards: int
    files: int
    est_time: float

    @property
    def job_id(self) -> str:
        return self.suite if self.stage == "nightly" else f"stage-{self.stage.lower()}-{self.target}"

    @property
    def name_prefix(self) -> str:
        """What every matrix entry's job name starts with; the wait and health steps match on it."""
        return f"{self.job_id} / "


def suite_target(suite: str) -> str:
    match = re.match(r"^(?:base-[abc]-test|nightly-[a-z0-9]+)-(.+)$", suite)
    if not match:
        raise ValueError(f"suite {suite!r} has no target part")
    return match.group(1)


def shard_count(est_times: Sequence[float], hw: str) -> int:
    """Enough shards that the LPT-heaviest shard stays near the target, never more shards than files."""
    if not est_times:
        return 0
    wanted = max(1, math.ceil(sum(est_times) / SHARD_TARGET_S[hw]))
    shards = min(wanted, MAX_SHARDS, len(est_times))
    return shards


def plan_jobs(registrations: Iterable[Registration], nightly: bool) -> list[SuiteJob]:
    """The test jobs a workflow has: one per suite (stages A-C for pr-test, nightly suites for nightly)."""
    by_suite: dict[tuple[str, str], list[Registration]] = {}
    for reg in registrations:
        if reg.disabled or (suite_stage(reg.suite) == "nightly") != nightly:
            continue
        by_suite.setdefault((reg.suite, reg.hw), []).append(reg)
    jobs = []
    for (suite, hw), regs in by_suite.items():
        weights = {r.path: r.est_time for r in regs}
        shards = shard_count(list(weights.values()), hw)
        lpt_partition(weights, shards)  # the runner partitions the same way with --auto-partition-size
        jobs.append(
            SuiteJob(suite_stage(suite), hw, suite, suite_target(suite), shards, len(regs), sum(weights.values()))
        )
    order = {"A": 0, "B": 1, "C": 2, "nightly": 3}
    return sorted(jobs, key=lambda j: (order[j.stage], HARDWARE.index(j.hw), j.target))


@dataclass(frozen=True)
class ChangeSet:
    code: bool  # anything other than docs changed
    paths: tuple[str, ...]


def classify_changes(paths: Iterable[str]) -> ChangeSet:
    paths = tuple(p for p in paths if p)
    return ChangeSet(code=any(not DOC_ONLY.search(p) for p in paths), paths=paths)


@dataclass(frozen=True)
class GateDecision:
    run: Mapping[str, bool]  # hardware -> whether its jobs run
    parallel: bool  # scheduled runs: stages in parallel, continue on error, no fast-fail
    reason: str


def gate(event_name: str, is_draft: bool, labels: Sequence[str], changes: ChangeSet) -> GateDecision:
    """Whether each hardware's jobs run for this event."""
    nothing = dict.fromkeys(HARDWARE, False)
    everything = dict.fromkeys(HARDWARE, True)
    if event_name == "schedule":
        return GateDecision(everything, True, "scheduled run: every stage, in parallel")
    if event_name == "workflow_dispatch":
        return GateDecision(everything, False, "manual run: every stage")
    if event_name != "pull_request":
        return GateDecision(nothing, False, f"event {event_name} does not run pr-test")
    if is_draft:
        return GateDecision(nothing, False, "draft pull request: mark it ready for review to run CI")
    if not changes.code:
        return GateDecision(nothing, False, "only documentation changed")
    labelled = CI_LABEL in labels
    run = {hw: hw == "cpu" or labelled for hw in HARDWARE}
    reason = "CPU and accelerator stages" if labelled else f"CPU stages only; add the `{CI_LABEL}` label for GPU/TPU"
    return GateDecision(run, False, reason)


def failed_jobs(jobs: Iterable[Mapping[str, object]], own_name: str = "") -> list[str]:
    """Names of jobs of this run that already ended badly (the health step fails fast on any)."""
    return sorted(str(j["name"]) for j in jobs if j.get("conclusion") in BAD_CONCLUSIONS and j.get("name") != own_name)


def wait_verdict(jobs: Iterable[Mapping[str, object]], expected: Mapping[str, int]) -> tuple[str, str]:
    """("pending" | "success" | "failure", why) for a stage whose jobs start with the prefixes in `expected`.

    `expected` maps a job-name prefix to the matrix size the generator wrote; more jobs than that is a
    failure (the workflow drifted from the generator), fewer means still queued.
    """
    jobs = list(jobs)
    for prefix, count in sorted(expected.items()):
        mine = [j for j in jobs if str(j.get("name", "")).startswith(prefix)]
        bad = [str(j["name"]) for j in mine if j.get("conclusion") in BAD_CONCLUSIONS]
        if bad:
            return "failure", f"{', '.join(sorted(bad))} failed"
        if len(mine) > count:
            return (
                "failure",
                f"{len(mine)} jobs named {prefix!r}*, the generator expected {count}: regenerate the workflows",
            )
        done = [j for j in mine if j.get("status") == "completed"]
        if len(done) < count:
            return "pending", f"{prefix!r}: {len(done)} of {count} done"
    return "success", "all " + ", ".join(f"{c} {p.strip(' /')}" for p, c in sorted(expected.items())) + " jobs passed"


def finish_verdict(needs: Mapping[str, Mapping[str, object]]) -> tuple[bool, str]:
    """The finish job: fail when any job failed or was cancelled; skipped jobs (gated off) are fine."""
    bad = sorted(
        f"{name}: {info.get('result')}"
        for name, info in needs.items()
        if info.get("result") in ("failure", "cancelled")
    )
    if bad:
        return False, "failed or cancelled: " + "; ".join(bad)
    ran = sorted(name for name, info in needs.items() if info.get("result") == "success")
    return True, f"{len(ran)} job(s) succeeded, {len(needs) - len(ran)} skipped"
