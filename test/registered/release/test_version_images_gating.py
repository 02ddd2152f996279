"""Pure release/CI decisions: versions from git state, image tags, smoke check, gating, wait and finish."""

import datetime
import json

import pytest
from packaging.version import Version

from release.gating import (
    ChangeSet,
    SuiteJob,
    classify_changes,
    failed_jobs,
    finish_verdict,
    gate,
    plan_jobs,
    shard_count,
    wait_verdict,
)
from release.images import check_smoke_output, image_tags, smoke_run_command
from release.publish import foreign_files
from release.version import GitState, VersionError, compute_version, is_policy_version, is_publishable
from slime.testing.ci_register import register_cpu_ci
from slime.testing.registry import Registration

register_cpu_ci(est_time=3, suite="base-a-test-cpu")

SHA = "0123456789abcdef0123456789abcdef01234567"
D1, D2 = datetime.date(2025, 3, 4), datetime.date(2025, 3, 5)


def state(tag="v0.2.0", distance=0, dirty=False):
    return GitState(tag, distance, SHA, dirty)


# ---- versions -------------------------------------------------------------------------------------
def test_tagged_clean_head_is_the_release_version():
    assert compute_version(state(), "release", "0.1.0") == "0.2.0"
    assert compute_version(state(tag="0.3.1"), "release", "0.1.0") == "0.3.1"
    assert compute_version(state(), "dev", "0.1.0") == "0.2.0"


@pytest.mark.parametrize(
    "git, message",
    [
        (state(distance=3), r"HEAD is 3 commit\(s\) past v0.2.0"),
        (state(dirty=True), "uncommitted changes"),
        (GitState(None, 5, SHA, False), "no release tag"),
    ],
)
def test_release_refuses_untagged_or_dirty(git, message):
    with pytest.raises(VersionError, match=message):
        compute_version(git, "release", "0.1.0")


def test_nightly_is_next_patch_dev_date_and_pep440():
    version = compute_version(state(distance=4), "nightly", "0.1.0", D1)
    assert version == "0.2.1.dev20250304"
    parsed = Version(version)
    assert parsed.is_devrelease and parsed.is_prerelease  # pip takes it only with --pre
    assert str(parsed) == version  # already normalized


def test_nightlies_are_monotonic_across_days_and_tags():
    sequence = [
        compute_version(GitState(None, 9, SHA, False), "nightly", "0.1.0", D1),  # before any tag
        compute_version(GitState(None, 10, SHA, False), "nightly", "0.1.0", D2),
        compute_version(GitState("v0.1.0", 0, SHA, False), "release", "0.1.0"),  # first release
        compute_version(GitState("v0.1.0", 2, SHA, False), "nightly", "0.1.0", D1 + datetime.timedelta(days=2)),
        compute_version(GitState("v0.1.1", 0, SHA, False), "release", "0.1.0"),
        compute_version(GitState("v0.1.1", 1, SHA, False), "nightly", "0.1.0", D1 + datetime.timedelta(days=9)),
    ]
    assert sequence[0] == "0.1.0.dev20250304"
    assert [Version(v) for v in sequence] == sorted(Version(v) for v in sequence)
    assert len(set(sequence)) == len(sequence)


def test_nightly_refuses_dirty_tree_and_needs_a_date():
    with pytest.raises(VersionError, match="uncommitted"):
        compute_version(state(dirty=True), "nightly", "0.1.0", D1)
    with pytest.raises(VersionError, match="date"):
        compute_version(state(), "nightly", "0.1.0", None)


def test_untagged_and_dirty_dev_builds_carry_an_unpublishable_local_label():
    untagged = compute_version(state(distance=3), "dev", "0.1.0")
    dirty = compute_version(state(distance=3, dirty=True), "dev", "0.1.0")
    dirty_tag = compute_version(state(dirty=True), "dev", "0.1.0")
    assert untagged == "0.2.1.dev3+g0123456"
    assert dirty == "0.2.1.dev3+g0123456.dirty"
    assert dirty_tag == "0.2.1.dev0+g0123456.dirty"
    for version in (untagged, dirty, dirty_tag):
        assert Version(version).local is not None and not is_publishable(version)
    assert Version(untagged) > Version("0.2.0")
    assert is_publishable("0.2.1.dev20250304")


def test_bad_tag_and_unknown_channel_are_one_line_errors():
    with pytest.raises(VersionError, match="unknown channel 'beta'"):
        compute_version(state(), "beta", "0.1.0")
    with pytest.raises(VersionError, match="release tags look like v1.2.3"):
        compute_version(GitState(None, 1, SHA, False), "nightly", "one", D1)


# ---- images ----------------------------------------------------------------------------------------
def test_image_tags_for_release_and_nightly():
    repo = "ghcr.io/slime-rl/slime"
    assert image_tags(repo, "cuda", "0.2.0", "release") == [f"{repo}:0.2.0-cuda", f"{repo}:latest-cuda"]
    assert image_tags(repo, "tpu", "0.2.1.dev20250304", "nightly", D1) == [
        f"{repo}:nightly-tpu",
        f"{repo}:nightly-tpu-20250304",
        f"{repo}:0.2.1.dev20250304-tpu",
    ]


@pytest.mark.parametrize(
    "args, message",
    [
        (("r", "vax", "0.2.0", "release"), "unknown hardware 'vax'"),
        (("r", "cpu", "0.2.1.dev20250304", "release"), "X.Y.Z"),
        (("r", "cpu", "0.2.1.dev3+g0123456", "nightly", D1), "local label"),
        (("r", "cpu", "0.2.1.dev20250304", "nightly", D2), "does not carry the build date 20250305"),
        (("Ghcr.io/X", "cpu", "0.2.0", "release"), "lower-case"),
    ],
)
def test_image_tags_refuse_bad_input(args, message):
    with pytest.raises(ValueError, match=message):
        image_tags(*args)


def env_report(selected, available=True, version="0.2.0"):
    return json.dumps(
        {
            "slime": version,
            "selected": selected,
            "selection_error": "" if selected else "no GPU",
            "backends": [{"name": "cuda", "available": available, "reason": "" if available else "no NVIDIA GPU"}],
        }
    )


def test_smoke_check_accepts_usable_backend_and_rejects_others():
    assert check_smoke_output("cuda", env_report("cuda"), "0.2.0") == []
    problems = check_smoke_output("cuda", env_report(None, available=False), "0.2.0")
    assert any("not usable" in p for p in problems) and any("no NVIDIA GPU" in p for p in problems)
    assert check_smoke_output("cuda", env_report("cuda", version="0.1.9"), "0.2.0") == [
        "image carries slime 0.1.9, expected 0.2.0"
    ]
    assert "not JSON" in check_smoke_output("cuda", "Traceback ...", None)[0]
    assert smoke_run_command("rocm", "img")[:4] == ["docker", "run", "--rm", "--device"]
    assert smoke_run_command("rocm", "img")[-5:] == ["slime", "env", "--json", "--hardware", "rocm"]


def test_smoke_check_refuses_an_image_whose_pinned_source_is_not_the_known_good_commit():
    """The TPU image builds sglang-jax from its known-good commit; `slime env --json` in the image says whether the
    installed one is that commit, and the smoke check fails the image when it is not."""
    report = json.loads(env_report("tpu"))
    report["backends"] = [{"name": "tpu", "available": True, "reason": ""}]
    entry = {"backend": "tpu", "package": "sglang-jax", "version": "0.0.2", "known_good": False, "summary": "x"}
    report["pinned_sources"] = [entry]
    assert check_smoke_output("tpu", json.dumps(report), "0.2.0") == ["image carries sglang-jax 0.0.2: x"]
    report["pinned_sources"] = [dict(entry, known_good=True)]
    assert check_smoke_output("tpu", json.dumps(report), "0.2.0") == []
    # another backend's pinned package is not this image's business
    assert check_smoke_output("cuda", env_report("cuda"), "0.2.0") == []


def test_policy_versions_are_exactly_what_compute_version_makes_for_release_and_nightly():
    state = GitState("v0.3.0", 2, "a" * 40, False)
    assert is_policy_version(compute_version(state, "nightly", "0.1.0", datetime.date(2026, 12, 2)))
    assert is_policy_version(compute_version(GitState("v0.3.0", 0, "a" * 40, False), "release", "0.1.0"))
    assert not is_policy_version(compute_version(state, "dev", "0.1.0"))  # local label
    for foreign in ("1.0", "0.0.0.post1", "2.1.0rc1", "1!1.0.0", "01.2.3", "0.3.1.dev20261399", "0.3.1.dev5"):
        assert not is_policy_version(foreign), foreign
    listed = [
        "slime_rl-0.3.0-py3-none-any.whl",
        "slime-rl-0.3.1.dev20261202.tar.gz",
        "slime_rl-1.0.tar.gz",
        "lme-0.1.tar.gz",
    ]
    assert foreign_files(listed) == ["slime_rl-1.0.tar.gz", "lme-0.1.tar.gz"]


# ---- gating ----------------------------------------------------------------------------------------
CODE = ChangeSet(code=True, paths=("slime/loop.py",))


def test_change_classification():
    assert classify_changes(["README.md", "docs/a.png", "RELEASING.md"]).code is False
    assert classify_changes(["README.md", "slime/cli.py"]).code is True
    assert classify_changes([]).code is False


@pytest.mark.parametrize(
    "event, draft, labels, changes, run, parallel",
    [
        ("pull_request", True, ["run-ci"], CODE, set(), False),
        ("pull_request", False, [], CODE, {"cpu"}, False),
        ("pull_request", False, ["run-ci"], CODE, {"cpu", "cuda", "rocm", "tpu"}, False),
        ("pull_request", False, ["run-ci"], ChangeSet(False, ("README.md",)), set(), False),
        ("schedule", False, [], ChangeSet(False, ()), {"cpu", "cuda", "rocm", "tpu"}, True),
        ("workflow_dispatch", False, [], ChangeSet(False, ()), {"cpu", "cuda", "rocm", "tpu"}, False),
        ("push", False, [], CODE, set(), False),
    ],
)
def test_gate(event, draft, labels, changes, run, parallel):
    decision = gate(event, draft, labels, changes)
    assert {hw for hw, on in decision.run.items() if on} == run
    assert decision.parallel is parallel
    assert decision.reason


def reg(path, suite, est, hw="cpu", disabled=None):
    return Registration(path, 1, hw, suite, est, suite.startswith("nightly-"), disabled)


def test_plan_jobs_one_per_suite_with_lpt_shards():
    regs = [reg(f"t/a{i}.py", "base-a-test-cpu", 5) for i in range(4)]
    regs += [reg(f"t/c{i}.py", "base-c-test-cpu", 600) for i in range(5)]  # 3000 s -> 4 shards of <= 900
    regs += [reg("t/g.py", "base-b-test-1-gpu", 300, hw="cuda"), reg("t/x.py", "base-b-test-2-gpu", 30, hw="cuda")]
    regs += [reg("t/off.py", "base-b-test-cpu", 30, disabled="flaky"), reg("t/n.py", "nightly-perf-cpu", 60)]
    jobs = plan_jobs(regs, nightly=False)
    assert [(j.job_id, j.shards, j.files) for j in jobs] == [
        ("stage-a-cpu", 1, 4),
        ("stage-b-1-gpu", 1, 1),
        ("stage-b-2-gpu", 1, 1),
        ("stage-c-cpu", 4, 5),
    ]
    assert [j.job_id for j in plan_jobs(regs, nightly=True)] == ["nightly-perf-cpu"]
    assert (
        shard_count([10.0] * 3, "cpu") == 1 and shard_count([2000.0] * 20, "cpu") == 8 and shard_count([], "cpu") == 0
    )


def job(name, status="completed", conclusion="success"):
    return {"name": name, "status": status, "conclusion": conclusion}


def test_health_fast_fails_on_any_failed_or_cancelled_job_but_itself():
    jobs = [job("stage-a-cpu / 0"), job("stage-a-cpu / 1", conclusion="failure"), job("x", "in_progress", None)]
    assert failed_jobs(jobs) == ["stage-a-cpu / 1"]
    assert failed_jobs(jobs, own_name="stage-a-cpu / 1") == []
    assert failed_jobs([job("a", conclusion="cancelled"), job("b", conclusion="skipped")]) == ["a"]


def test_wait_verdicts():
    expected = {"stage-a-cpu / ": 2, "stage-a-lint / ": 1}
    done = [job("stage-a-cpu / 0"), job("stage-a-cpu / 1"), job("stage-a-lint / x")]
    assert wait_verdict(done, expected)[0] == "success"
    assert wait_verdict(done[:2] + [job("stage-a-lint / x", "in_progress", None)], expected)[0] == "pending"
    assert wait_verdict(done[:1], expected)[0] == "pending"  # shard 1 not even queued yet
    verdict, why = wait_verdict([*done[:1], job("stage-a-cpu / 1", conclusion="failure")], expected)
    assert verdict == "failure" and "stage-a-cpu / 1" in why
    verdict, why = wait_verdict([*done, job("stage-a-cpu / 2")], expected)
    assert verdict == "failure" and "regenerate" in why


def test_finish_verdict():
    assert finish_verdict({"gate": {"result": "success"}, "stage-b-1-gpu": {"result": "skipped"}}) == (
        True,
        "1 job(s) succeeded, 1 skipped",
    )
    ok, message = finish_verdict({"a": {"result": "success"}, "b": {"result": "failure"}, "c": {"result": "cancelled"}})
    assert not ok and message == "failed or cancelled: b: failure; c: cancelled"


def test_job_names_match_wait_prefixes():
    j = SuiteJob("B", "cuda", "base-b-test-2-gpu", "2-gpu", 3, 7, 900.0)
    assert j.job_id == "stage-b-2-gpu" and j.name_prefix == "stage-b-2-gpu / "
