"""Drive test/run_suite.py on a temporary tree: pass, fail, hang (with an escaping child), crash."""

import json
import os
import subprocess
import sys
import textwrap
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from slime.testing.ci_register import register_cpu_ci

register_cpu_ci(est_time=25, suite="base-a-test-cpu")

REPO = Path(__file__).resolve().parents[3]
RUN_SUITE = REPO / "test" / "run_suite.py"

IMPORT = "from slime.testing.ci_register import register_cpu_ci\n"
FILES = {
    "test_pass.py": (5, "def test_ok():\n    assert 1 + 1 == 2\n"),
    "test_fail.py": (4, "def test_bad():\n    assert 1 + 1 == 3\n"),
    "test_crash.py": (3, "import os, signal\n\ndef test_segv():\n    os.kill(os.getpid(), signal.SIGSEGV)\n"),
    "test_hang.py": (
        2,
        textwrap.dedent(
            """
            import os, subprocess, sys, time

            def test_hang():
                # a grandchild that leaves our process group, as daemons do
                child = subprocess.Popen([sys.executable, "-c", "import os, time; os.setsid(); time.sleep(300)"])
                with open(os.environ["PIDFILE"], "w") as f:
                    f.write(str(child.pid))
                time.sleep(300)
            """
        ),
    ),
    "test_empty.py": (1, "def helper():\n    pass\n"),
}


def make_tree(tmp_path: Path, names) -> Path:
    root = tmp_path / "registered"
    root.mkdir()
    for name in names:
        est, body = FILES[name]
        (root / name).write_text(f"{IMPORT}register_cpu_ci(est_time={est}, suite='base-a-test-cpu')\n{body}")
    return root


def run(root: Path, *args, env_extra=None):
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run(
        [
            sys.executable,
            str(RUN_SUITE),
            "--hw",
            "cpu",
            "--suite",
            "base-a-test-cpu",
            "--root",
            str(root),
            "--isolate-network",
            "off",
            *args,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] != "Z"


def test_mixed_tree_continue_on_error(tmp_path):
    root = make_tree(tmp_path, FILES)
    pidfile = tmp_path / "grandchild.pid"
    junit = tmp_path / "out" / "junit.xml"
    durations = tmp_path / "durations.json"
    proc = run(
        root,
        "--continue-on-error",
        "--timeout-per-file",
        "8",
        "--junit-xml",
        str(junit),
        "--durations-out",
        str(durations),
        env_extra={"PIDFILE": str(pidfile)},
    )
    out = proc.stdout
    assert proc.returncode == 1, out + proc.stderr
    assert out.strip().splitlines()[-1] == "1 passed, 3 failed, 1 skipped"
    assert "end registered/test_hang.py: FAILED TIMEOUT" in out
    assert "end registered/test_crash.py: FAILED exit" in out and "(crash)" in out
    assert "end registered/test_fail.py: FAILED exit 1 (unknown)" in out
    # the grandchild escaped the process group with setsid; it must still be dead
    grandchild = int(pidfile.read_text())
    deadline = time.time() + 5
    while pid_alive(grandchild) and time.time() < deadline:
        time.sleep(0.1)
    assert not pid_alive(grandchild)
    suite = ET.parse(junit).getroot()
    assert (suite.get("tests"), suite.get("failures"), suite.get("skipped")) == ("5", "3", "1")
    failure_types = {c.get("name"): c.find("failure").get("type") for c in suite if c.find("failure") is not None}
    assert failure_types == {
        "registered/test_fail.py": "unknown",
        "registered/test_crash.py": "crash",
        "registered/test_hang.py": "timeout",
    }
    measured = json.loads(durations.read_text())
    assert set(measured) == {
        "registered/test_pass.py",
        "registered/test_fail.py",
        "registered/test_crash.py",
        "registered/test_hang.py",
    }
    assert measured["registered/test_hang.py"] >= 8


def test_stops_at_first_failure_by_default(tmp_path):
    root = make_tree(tmp_path, ["test_pass.py", "test_fail.py", "test_empty.py"])
    proc = run(root)
    # LPT order: heaviest first -> pass (5), fail (4), then it stops before empty (1)
    assert proc.returncode == 1
    assert "stopping at the first failure" in proc.stdout
    assert proc.stdout.strip().splitlines()[-1] == "1 passed, 1 failed, 0 skipped"


def test_no_tests_collected_is_not_a_failure(tmp_path):
    root = make_tree(tmp_path, ["test_empty.py"])
    proc = run(root)
    assert proc.returncode == 0, proc.stdout
    assert proc.stdout.strip().splitlines()[-1] == "0 passed, 0 failed, 1 skipped"


SKIPS = "import pytest\n\ndef test_needs_gpu():\n    pytest.skip('no GPU here')\n\ndef test_other():\n    pytest.skip('x')\n"


def test_all_skipped_file_is_skipped_and_an_all_skipped_nightly_suite_fails(tmp_path):
    root = tmp_path / "registered"
    root.mkdir()
    (root / "test_skips.py").write_text(f"{IMPORT}register_cpu_ci(est_time=1, suite='base-a-test-cpu')\n{SKIPS}")
    (root / "test_pass.py").write_text(
        f"{IMPORT}register_cpu_ci(est_time=1, suite='base-a-test-cpu')\n{FILES['test_pass.py'][1]}"
    )
    proc = run(root)
    assert proc.returncode == 0, proc.stdout
    assert "end registered/test_skips.py: SKIPPED (all 2 tests skipped: no GPU here)" in proc.stdout
    assert proc.stdout.strip().splitlines()[-1] == "1 passed, 0 failed, 1 skipped"

    nightly = tmp_path / "nightly"
    nightly.mkdir()
    (nightly / "test_skips.py").write_text(
        f"{IMPORT}register_cpu_ci(est_time=1, suite='nightly-accuracy-cpu', nightly=True)\n{SKIPS}"
    )
    proc = subprocess.run(
        [sys.executable, str(RUN_SUITE), "--hw", "cpu", "--stage", "nightly", "--nightly", "--root", str(nightly),
         "--isolate-network", "off"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stdout
    lines = proc.stdout.strip().splitlines()
    assert lines[-2].startswith("error: no test executed in nightly-accuracy-cpu on --hw cpu"), lines[-3:]
    assert lines[-1] == "0 passed, 0 failed, 1 skipped"


def test_threshold_failure_is_retried_code_error_is_not(tmp_path):
    root = tmp_path / "registered"
    root.mkdir()
    counter = tmp_path / "count"
    (root / "test_flaky.py").write_text(
        IMPORT + "register_cpu_ci(est_time=2, suite='base-a-test-cpu')\nimport os\n"
        "def test_acc():\n    p = os.environ['COUNTER']\n    n = int(open(p).read()) if os.path.exists(p) else 0\n"
        "    open(p, 'w').write(str(n + 1))\n    assert n >= 1, 'accuracy 0.5 below threshold 0.8'\n"
    )
    (root / "test_typo.py").write_text(
        IMPORT + "register_cpu_ci(est_time=1, suite='base-a-test-cpu')\ndef test_t():\n    undefined_name\n"
    )
    proc = run(
        root, "--enable-retry", "--max-attempts", "3", "--continue-on-error", env_extra={"COUNTER": str(counter)}
    )
    assert "retrying registered/test_flaky.py (threshold), attempt 2/3" in proc.stdout
    assert "retrying registered/test_typo.py" not in proc.stdout
    assert counter.read_text() == "2"
    assert proc.stdout.strip().splitlines()[-1] == "1 passed, 1 failed, 0 skipped"


def test_list_partition_and_durations_in(tmp_path):
    root = make_tree(tmp_path, ["test_pass.py", "test_fail.py", "test_crash.py", "test_hang.py"])
    proc = run(root, "--list", "--auto-partition-size", "2")
    rows = {line.split()[0]: line.split()[2] for line in proc.stdout.splitlines()[1:-1]}
    # est 5,4,3,2 -> shard0: pass(5), hang(2) ; shard1: fail(4), crash(3)
    assert rows == {
        "registered/test_pass.py": "0",
        "registered/test_hang.py": "0",
        "registered/test_fail.py": "1",
        "registered/test_crash.py": "1",
    }
    measured = tmp_path / "d.json"
    measured.write_text(json.dumps({"registered/test_hang.py": 100}))
    proc = run(root, "--list", "--auto-partition-size", "2", "--durations-in", str(measured))
    rows = {line.split()[0]: line.split()[2] for line in proc.stdout.splitlines()[1:-1]}
    assert rows["registered/test_hang.py"] == "0" and {rows[k] for k in rows if "hang" not in k} == {"1"}


def test_unknown_suite_and_bad_registration_are_one_line_errors(tmp_path):
    root = make_tree(tmp_path, ["test_pass.py"])
    proc = subprocess.run(
        [sys.executable, str(RUN_SUITE), "--hw", "cpu", "--suite", "base-q-test-cpu", "--root", str(root)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: unknown suite base-q-test-cpu for --hw cpu; known suites: base-a-test-cpu"
    (root / "test_bad.py").write_text("register_cpu_ci(est_time=1, suite='base-a-test-cpu', size='big')\n")
    proc = run(root)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: registered/test_bad.py:1: unknown keyword 'size'")


def test_coverage_map_of_repository():
    proc = subprocess.run(
        [sys.executable, str(RUN_SUITE), "--hw", "cpu", "--coverage-map"], capture_output=True, text=True
    )
    assert proc.returncode == 0
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("| stage | suite | hardware | files |")
    assert any(line.startswith("| A | base-a-test-cpu | cpu |") for line in lines)
