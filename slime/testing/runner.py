"""Run registered test files: one process group each, timeouts that kill the whole tree, retries, reports."""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

from slime.testing.registry import Registration
from slime.testing.retry import FailureKind, classify_failure, should_retry

PYTEST_NO_TESTS = 5
_PR_SET_CHILD_SUBREAPER = 36


@dataclass
class FileResult:
    registration: Registration
    status: str  # "passed" | "failed" | "skipped"
    elapsed: float
    attempts: int = 1
    returncode: int | None = None
    timed_out: bool = False
    failure_kind: FailureKind | None = None
    output: str = ""
    skip_reason: str = ""
    attempt_kinds: list[str] = field(default_factory=list)


def become_subreaper() -> bool:
    """Orphans of our children re-parent to us (Linux), so a daemon that escaped its process group is
    still ours to find and kill."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except OSError:
        return False


def _children_of(pid: int) -> list[int]:
    kids: list[int] = []
    task_dir = Path(f"/proc/{pid}/task")
    try:
        for task in task_dir.iterdir():
            try:
                kids.extend(int(x) for x in (task / "children").read_text().split())
            except OSError:
                continue
    except OSError:
        pass
    return kids


def descendants(pid: int) -> list[int]:
    out: list[int] = []
    stack = [pid]
    while stack:
        for kid in _children_of(stack.pop()):
            out.append(kid)
            stack.append(kid)
    return out


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the process group and every descendant (including ones that called setsid)."""
    victims = descendants(proc.pid)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    for pid in victims:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


def reap_orphans() -> None:
    """Kill and reap anything left under us (subreaper) once a file is done."""
    for pid in descendants(os.getpid()):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def build_command(path: Path, isolate_network: bool, python: str | None = None) -> list[str]:
    # -rs: the reason of each skip, so an all-skipped file can say why
    pytest_cmd = [python or sys.executable, "-m", "pytest", "-q", "-x", "-rs", "-p", "no:cacheprovider", str(path)]
    if not isolate_network:
        return pytest_cmd
    # A private network namespace: only loopback exists, so nothing the test starts (Ray, HTTP servers)
    # can listen beyond this machine.
    quoted = " ".join(_shell_quote(a) for a in pytest_cmd)
    return ["unshare", "-n", "sh", "-c", f"ip link set lo up && exec {quoted}"]


def _shell_quote(arg: str) -> str:
    import shlex

    return shlex.quote(arg)


def network_isolation_available() -> bool:
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return False
    probe = subprocess.run(["unshare", "-n", "sh", "-c", "ip link set lo up"], capture_output=True)
    return probe.returncode == 0


def run_once(
    path: Path, timeout: float, env: dict[str, str], isolate_network: bool, python: str | None = None
) -> tuple[int | None, bool, str, float]:
    return run_command(build_command(path, isolate_network, python), timeout, env)


def run_command(
    argv: list[str], timeout: float, env: dict[str, str], cwd: Path | None = None
) -> tuple[int | None, bool, str, float]:
    """(exit code or None on timeout, timed out, stdout+stderr, seconds). A timeout kills the whole process
    tree, and whatever the command left running is reaped afterwards."""
    start = time.monotonic()
    proc = subprocess.Popen(
        argv,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=env,
        start_new_session=True,  # its own process group, so a timeout can take the whole group down
    )
    timed_out = False
    try:
        raw, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        kill_tree(proc)
        raw, _ = proc.communicate()
    reap_orphans()
    output = raw.decode("utf-8", errors="replace") if raw else ""
    return (None if timed_out else proc.returncode), timed_out, output, time.monotonic() - start


def run_file(
    reg: Registration,
    root: Path,
    timeout: float,
    env: dict[str, str],
    max_attempts: int = 1,
    isolate_network: bool = False,
    echo=print,
    python: str | None = None,
    missing_stack: str | None = None,
) -> FileResult:
    """Run one registered file with `python` (default: this interpreter); `missing_stack` says why the stack
    the file needs is absent here, and the file is then reported skipped with that reason."""
    if reg.disabled:
        return FileResult(reg, "skipped", 0.0, attempts=0, skip_reason=reg.disabled)
    if missing_stack:
        return FileResult(reg, "skipped", 0.0, attempts=0, skip_reason=missing_stack)
    path = root / reg.path
    total = 0.0
    kinds: list[str] = []
    attempt = 0
    while True:
        attempt += 1
        returncode, timed_out, output, elapsed = run_once(path, timeout, env, isolate_network, python)
        total += elapsed
        if returncode == 0 and (skip_reason := all_skipped_reason(output)) is not None:
            return FileResult(reg, "skipped", total, attempt, 0, False, None, output, skip_reason, kinds)
        if returncode == 0:
            return FileResult(reg, "passed", total, attempt, 0, False, None, output, attempt_kinds=kinds)
        if returncode == PYTEST_NO_TESTS:
            return FileResult(reg, "skipped", total, attempt, 5, False, None, output, "no tests collected", kinds)
        kind = classify_failure(output, returncode, timed_out)
        kinds.append(kind.value)
        if not should_retry(kind, attempt, max_attempts):
            return FileResult(reg, "failed", total, attempt, returncode, timed_out, kind, output, attempt_kinds=kinds)
        echo(f"  retrying {reg.path} ({kind.value}), attempt {attempt + 1}/{max_attempts}")


_OUTCOME = re.compile(r"(\d+) (passed|failed|skipped|xfailed|xpassed|errors?|deselected)\b")
_SKIP_REASON = re.compile(r"^SKIPPED \[\d+\] [^:]+:\d+: (.*)$", re.MULTILINE)


def pytest_outcomes(output: str) -> dict[str, int]:
    """Counts from pytest's final summary line ("3 passed, 1 skipped in 2.1s"); {} when there is none."""
    for line in reversed(output.strip().splitlines()):
        if " in " in line and (found := _OUTCOME.findall(line)):
            return {kind: int(n) for n, kind in found}
    return {}


def all_skipped_reason(output: str) -> str | None:
    """For a pytest run that succeeded: the (first) skip reason when no test executed, else None."""
    counts = pytest_outcomes(output)
    executed = sum(counts.get(k, 0) for k in ("passed", "failed", "xfailed", "xpassed", "error", "errors"))
    if executed or not counts.get("skipped"):
        return None
    reasons = _SKIP_REASON.findall(output)
    return f"all {counts['skipped']} tests skipped" + (f": {reasons[0]}" if reasons else "")


def summary_line(results: list[FileResult]) -> str:
    passed = sum(r.status == "passed" for r in results)
    failed = sum(r.status == "failed" for r in results)
    skipped = sum(r.status == "skipped" for r in results)
    return f"{passed} passed, {failed} failed, {skipped} skipped"


def nothing_executed(results: list[FileResult]) -> bool:
    """No file ran a test (every one skipped, disabled or empty): a green result that proved nothing."""
    return not any(r.status in ("passed", "failed") for r in results)


def write_junit(results: list[FileResult], path: Path, suite_name: str) -> None:
    failures = sum(r.status == "failed" for r in results)
    skipped = sum(r.status == "skipped" for r in results)
    suite = ET.Element(
        "testsuite",
        name=suite_name,
        tests=str(len(results)),
        failures=str(failures),
        skipped=str(skipped),
        errors="0",
        time=f"{sum(r.elapsed for r in results):.3f}",
    )
    for r in results:
        case = ET.SubElement(
            suite, "testcase", classname=r.registration.suite, name=r.registration.path, time=f"{r.elapsed:.3f}"
        )
        if r.status == "failed":
            kind = r.failure_kind.value if r.failure_kind else "unknown"
            message = "timed out" if r.timed_out else f"exit code {r.returncode}"
            node = ET.SubElement(case, "failure", message=f"{message} ({kind})", type=kind)
            node.text = r.output[-20000:]
        elif r.status == "skipped":
            ET.SubElement(case, "skipped", message=r.skip_reason)
        if r.output:
            ET.SubElement(case, "system-out").text = r.output[-20000:]
    path.parent.mkdir(parents=True, exist_ok=True)
    ET.ElementTree(suite).write(path, encoding="utf-8", xml_declaration=True)
