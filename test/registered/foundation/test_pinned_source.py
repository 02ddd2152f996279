"""Packages run from a known-good commit: whether the installed copy is that commit, read from its version and
pip's direct_url.json only (`slime env` never imports them)."""

import json

import pytest

from slime.backends.base import SystemView
from slime.backends.pinned_source import PinnedSource, installed_commit, pinned_source_verdict
from slime.env_report import format_report, pinned_sources_status
from slime.testing.ci_register import register_cpu_ci

register_cpu_ci(est_time=2, suite="base-a-test-cpu")

COMMIT = "cddbf6f1cc33cbdd453bd8f36ff7051cf46ca176"
OTHER = "0123456789abcdef0123456789abcdef01234567"
SOURCE = PinnedSource("sglang-jax", "https://github.com/sgl-project/sglang-jax", COMMIT, "python")


def git_install(commit: str) -> str:
    vcs = {"vcs": "git", "commit_id": commit, "requested_revision": commit}
    return json.dumps({"url": SOURCE.repository, "vcs_info": vcs, "subdirectory": "python"})


def archive_install(url: str) -> str:
    return json.dumps({"url": url, "archive_info": {"hash": "sha256=00"}})


def test_the_requirements_name_the_commit_and_the_subdirectory():
    assert SOURCE.git_requirement == (
        f"sglang-jax @ git+https://github.com/sgl-project/sglang-jax@{COMMIT}#subdirectory=python"
    )
    assert SOURCE.archive_requirement == (
        f"sglang-jax @ https://github.com/sgl-project/sglang-jax/archive/{COMMIT}.tar.gz#subdirectory=python"
    )
    assert SOURCE.install_command == f'pip install "{SOURCE.git_requirement}"'


@pytest.mark.parametrize(
    "version, direct_url, known_good, summary",
    [
        (None, None, False, "not installed (known-good: commit cddbf6f1cc33)"),
        # the wheel built at the commit (../shared/wheels), installed from a file: the version's label says it
        (
            "0.0.3.dev20260821+gcddbf6f1cc33",
            archive_install("file:///w/sglang_jax-0.0.3.dev20260821%2Bgcddbf6f1cc33-py3-none-any.whl"),
            True,
            "the known-good commit cddbf6f1cc33 (version label)",
        ),
        ("0.0.3", git_install(COMMIT), True, "the known-good commit cddbf6f1cc33 (git install)"),
        (
            "0.0.3",
            archive_install(f"{SOURCE.repository}/archive/{COMMIT}.tar.gz"),
            True,
            "the known-good commit cddbf6f1cc33 (archive install)",
        ),
        ("0.0.3", git_install(OTHER), False, "commit 0123456789ab, not the known-good commit cddbf6f1cc33"),
        ("0.0.2", None, False, "an index release, not the known-good commit cddbf6f1cc33"),
        (
            "0.0.3",
            json.dumps({"url": "file:///src/sglang-jax/python", "dir_info": {"editable": True}}),
            False,
            "a local folder",
        ),
        ("0.0.3+gcddbf6", None, False, "an index release"),  # 6 hex digits: too short to trust
        ("0.0.3+gcddbf6f", "{not json", True, "the known-good commit cddbf6f1cc33 (version label)"),
        ("not a version", None, False, "an index release"),
    ],
)
def test_the_verdict_on_what_is_installed(version, direct_url, known_good, summary):
    verdict = pinned_source_verdict(SOURCE, version, direct_url)
    assert (verdict.version, verdict.known_good) == (version, known_good)
    assert verdict.summary.startswith(summary), verdict.summary
    if version is not None and not known_good:
        assert verdict.summary.endswith(SOURCE.install_command)  # and how to get the right one


def test_a_git_install_of_another_commit_is_not_rescued_by_its_version_label():
    assert installed_commit("0.0.3+gcddbf6f1cc33", git_install(OTHER)) == (OTHER, "git install")


def test_slime_env_reports_the_backends_pinned_sources_from_metadata_only():
    versions = {"sglang-jax": "0.0.2"}
    system = SystemView(lambda m: False, versions.get, lambda p: False, lambda p: [], {})
    entries = pinned_sources_status(system)
    assert [(e["backend"], e["package"], e["version"], e["known_good"]) for e in entries] == [
        ("tpu", "sglang-jax", "0.0.2", False)
    ]
    assert entries[0]["install"].startswith('pip install "sglang-jax @ git+https://github.com/sgl-project/')
    report = {
        "slime": "0",
        "python": "3.12",
        "platform": "p",
        "requested": "auto",
        "selected": "cpu",
        "backends": [],
        "packages": {"sglang-jax": "0.0.2", "jax": None},
        "pinned_sources": entries,
        "extras": {},
    }
    lines = format_report(report).splitlines()
    assert any(line.startswith("  sglang-jax     0.0.2  an index release, not the known-good commit") for line in lines)
    assert "  jax            -" in lines
