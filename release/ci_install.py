"""CI's one install. A hosted (CPU) job of the generated workflows installs only by running .ci/install, the script
.ci/run runs too, so a pull request's CPU jobs test exactly the environments `.ci/run` tests; an accelerator job
installs only the [hw,test] extras over its runner's vendor stack. The checks here (install_route_problems,
script_install_problems; test/registered/release/test_ci_install.py) fail when a job or script takes another route.
"""

from __future__ import annotations

import re
import shlex

from release.resolve import PYTORCH_CPU_INDEX
from slime import DISTRIBUTION

SETUP_PYTHON = "actions/setup-python@a26af69be951a213d495a4c3e4e4022e16d87065"  # v5.6.0
# The Pythons the hosted jobs set up, the default (`python`) last: 3.11 for .venv, 3.12 for the TPU stack's
# environment (.venv-tpu). An environment .ci/install makes on another Python needs it listed here.
SETUP_PYTHON_VERSIONS = ("3.12", "3.11")
PYTHON_VERSION = SETUP_PYTHON_VERSIONS[-1]
CI_INSTALL = ".ci/install"
# The environments .ci/install makes besides .venv, by stack: run_suite.py runs a *-stack suite's files with that
# interpreter (and reports them skipped where it is absent, e.g. without Python 3.12).
STACK_PYTHONS = {"tpu": ".venv-tpu/bin/python"}
STACK_PYTHON_ARGS = " ".join(f"--stack-python {stack}={python}" for stack, python in STACK_PYTHONS.items())
CI_RUN = ".ci/run"
# Accelerator runners name their kind in a label (runner_for); each kind installs over its own stack.
ACCELERATOR_LABELS = {"nvidia": "cuda", "amd": "rocm", "tpu": "tpu"}


def accelerator_install(hw: str) -> str:
    """The one slime install an accelerator job makes: the test extra over the runner's vendor stack, held to the
    hardware's constraints."""
    return f'.venv/bin/python -m pip install -c requirements/constraints-{hw}.txt -e ".[{hw},test]"'


def setup_slime(hw: str) -> list[dict]:
    """Python and slime in .venv. On a hosted (CPU) runner: .ci/install, exactly what .ci/run installs. On an
    accelerator runner: the [hw,test] extras over the vendor stack the runner carries (torch + SGLang, or JAX),
    which the hardware's constraints keep at the one tested stack."""
    if hw == "cpu":
        return [
            {
                "name": "Set up Python",
                "uses": SETUP_PYTHON,
                "with": {"python-version": "\n".join(SETUP_PYTHON_VERSIONS)},
            },
            {
                "name": f"Install what {CI_RUN} installs ({CI_INSTALL})",
                # Where pip finds the CPU torch build, not what is installed: Linux torch from PyPI is the CUDA
                # build, and the constraints pin the same torch version either way.
                "env": {"PIP_EXTRA_INDEX_URL": PYTORCH_CPU_INDEX},
                "run": f"bash {CI_INSTALL}\n",
            },
        ]
    return [
        {
            "name": f"Install {DISTRIBUTION}[{hw},test] over the runner's {hw} stack",
            "run": f"python3 -m venv --system-site-packages .venv\n{accelerator_install(hw)}\n",
        }
    ]


def job_hardware(job: dict) -> str:
    """cpu for a hosted job, else the accelerator its runner label names."""
    labels = job["runs-on"] if isinstance(job["runs-on"], list) else [job["runs-on"]]
    for label in labels:
        kind = label.rsplit("-", 1)[0]
        if kind in ACCELERATOR_LABELS:
            return ACCELERATOR_LABELS[kind]
    return "cpu"


def installs_slime(line: str) -> bool:
    """Whether a shell line pip-installs this checkout (`.`, `.[extras]`, `-e .`), however it is quoted."""
    try:
        words = shlex.split(line, comments=True)
    except ValueError:
        words = line.split()
    pip = [
        i
        for i, word in enumerate(words[:-1])
        if word.rsplit("/", 1)[-1] in ("pip", "pip3") and words[i + 1] == "install"
    ]
    if not pip:
        return False
    targets = words[pip[0] + 2 :]
    return any(word == "." or word.startswith(".[") or word.startswith("-e.") for word in targets)


# What only CI's one install may do on a hosted runner: make a venv, run the setup script, install node tools.
OWN_INSTALL_WORDS = ("-m venv", "scripts/setup.sh", "npm ci", "npm install")


def install_route_problems(workflow: dict) -> list[str]:
    """One line per job of a generated workflow that installs slime by a route other than its machine's one: a
    hosted (CPU) job installs only by running .ci/install (after setting up PYTHON_VERSION), and every job that
    uses .venv has done so; an accelerator job installs only accelerator_install(hw) and never .ci/install."""
    problems: list[str] = []
    for name, job in workflow["jobs"].items():
        hw = job_hardware(job)
        steps = job.get("steps", [])
        runs = [step.get("run", "") for step in steps]
        ci_installs = [i for i, run in enumerate(runs) if run.strip() == f"bash {CI_INSTALL}"]
        for run in runs:
            if run.strip() == f"bash {CI_INSTALL}":
                continue
            for line in run.splitlines():
                if hw == "cpu" and (installs_slime(line) or any(word in line for word in OWN_INSTALL_WORDS)):
                    problems.append(f"{name}: installs by another route than {CI_INSTALL}: {line.strip()}")
                elif hw != "cpu" and installs_slime(line) and line.strip() != accelerator_install(hw):
                    problems.append(f"{name}: installs other than over its {hw} stack: {line.strip()}")
                elif hw != "cpu" and CI_INSTALL in line:
                    problems.append(f"{name}: an accelerator job runs {CI_INSTALL} (CPU only): {line.strip()}")
        uses_venv = any(".venv/" in run for run in runs)
        if hw == "cpu" and uses_venv and len(ci_installs) != 1:
            problems.append(f"{name}: uses .venv but runs {CI_INSTALL} {len(ci_installs)} times (once, please)")
        if hw == "cpu" and ci_installs:
            python = [s for s in steps[: ci_installs[0]] if s.get("uses") == SETUP_PYTHON]
            if not python or python[-1]["with"]["python-version"].split() != list(SETUP_PYTHON_VERSIONS):
                problems.append(
                    f"{name}: runs {CI_INSTALL} without setting up Python {', '.join(SETUP_PYTHON_VERSIONS)} first"
                )
    return problems


def script_install_problems(ci_run: str, ci_install: str) -> list[str]:
    """Why .ci/run and .ci/install are not the one install: .ci/run must install only by running .ci/install,
    and .ci/install must make every environment through scripts/setup.sh (no pip of its own) on the Python the
    generated jobs set up."""
    problems = []
    run_lines = [line.strip() for line in ci_run.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if f"bash {CI_INSTALL}" not in run_lines:
        problems.append(f"{CI_RUN} does not run `bash {CI_INSTALL}`")
    for line in run_lines:
        if installs_slime(line) or "pip install" in line or any(word in line for word in OWN_INSTALL_WORDS):
            problems.append(f"{CI_RUN} installs by another route than {CI_INSTALL}: {line}")
    install_lines = [
        line.strip() for line in ci_install.splitlines() if line.strip() and not line.lstrip().startswith("#")
    ]
    if not any("scripts/setup.sh" in line for line in install_lines):
        problems.append(f"{CI_INSTALL} does not run scripts/setup.sh")
    for line in install_lines:
        if "pip install" in line or "-m venv" in line:
            problems.append(f"{CI_INSTALL} installs Python packages other than through scripts/setup.sh: {line}")
        for version in re.findall(r"(?:python|find_python\.sh )(3\.\d+)", line):
            if version not in SETUP_PYTHON_VERSIONS:
                problems.append(
                    f"{CI_INSTALL} uses Python {version}, which the generated CPU jobs do not set up "
                    f"(setup_slime's setup-python step has {', '.join(SETUP_PYTHON_VERSIONS)})"
                )
    return problems
