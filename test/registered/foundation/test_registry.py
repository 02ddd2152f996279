"""The registration parser: what it accepts, and one clear file:line error for everything it rejects."""

from pathlib import Path

import pytest

from slime.testing.ci_register import register_cpu_ci
from slime.testing.registry import (
    RegistrationError,
    collect,
    parse_registrations,
    select,
    suite_hardware,
    suite_stage,
)

register_cpu_ci(est_time=5, suite="base-a-test-cpu")


def write(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / "registered" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(body)
    return path


def test_parses_all_hardware_and_keywords(tmp_path):
    path = write(
        tmp_path,
        "test_a.py",
        "from slime.testing.ci_register import *\n"
        "register_cpu_ci(est_time=30, suite='base-a-test-cpu')\n"
        "register_cuda_ci(est_time=300.5, suite='base-b-test-1-gpu', disabled='needs H100')\n"
        "register_rocm_ci(est_time=10, suite='base-b-test-1-gpu-amd')\n"
        "register_tpu_ci(est_time=7, suite='nightly-accuracy-tpu', nightly=True)\n",
    )
    regs = parse_registrations(path, "x/test_a.py")
    assert [(r.hw, r.suite, r.est_time, r.line) for r in regs] == [
        ("cpu", "base-a-test-cpu", 30.0, 2),
        ("cuda", "base-b-test-1-gpu", 300.5, 3),
        ("rocm", "base-b-test-1-gpu-amd", 10.0, 4),
        ("tpu", "nightly-accuracy-tpu", 7.0, 5),
    ]
    assert regs[1].disabled == "needs H100" and regs[3].nightly


def test_attribute_call_form_is_read(tmp_path):
    path = write(
        tmp_path,
        "test_b.py",
        "from slime.testing import ci_register\nci_register.register_cpu_ci(est_time=1, suite='base-c-test-cpu')\n",
    )
    assert parse_registrations(path)[0].suite == "base-c-test-cpu"


@pytest.mark.parametrize(
    "call, fragment",
    [
        ("register_cpu_ci(est_time=3, suite='base-a-test-cpu', nightli=True)", "unknown keyword 'nightli'"),
        ("register_cpu_ci(est_time=SECONDS, suite='base-a-test-cpu')", "est_time= must be a literal"),
        ("register_cpu_ci(est_time=-1, suite='base-a-test-cpu')", "positive number"),
        (
            "register_cpu_ci(est_time=3, suite='base-b-test-1-gpu')",
            "targets cuda, but is registered with register_cpu_ci",
        ),
        ("register_cuda_ci(est_time=3, suite='base-a-test-cpu')", "targets cpu"),
        ("register_cpu_ci(est_time=3, suite='fast-cpu')", "must look like"),
        ("register_cpu_ci(est_time=3)", "needs suite="),
        ("register_cpu_ci(3, suite='base-a-test-cpu')", "keyword arguments only"),
        ("register_cpu_ci(est_time=3, suite='nightly-accuracy-cpu')", "nightly=False does not match"),
        ("register_cpu_ci(est_time=3, suite='base-a-test-cpu', disabled='')", "non-empty reason"),
    ],
)
def test_rejections_name_file_and_line(tmp_path, call, fragment):
    path = write(tmp_path, "test_bad.py", f"import os\n\n{call}\n")
    with pytest.raises(RegistrationError) as info:
        parse_registrations(path, "test/registered/test_bad.py")
    message = str(info.value)
    assert message.startswith("test/registered/test_bad.py:3: ")
    assert fragment in message


def test_file_without_registration_is_an_error(tmp_path):
    write(tmp_path, "ok/test_ok.py", "register_cpu_ci(est_time=1, suite='base-a-test-cpu')\n")
    write(tmp_path, "ok/test_orphan.py", "def test_x():\n    pass\n")
    with pytest.raises(RegistrationError, match=r"registered/ok/test_orphan.py:1: no register_\*_ci"):
        collect(tmp_path / "registered")


def test_registration_inside_a_function_does_not_count(tmp_path):
    path = write(tmp_path, "test_f.py", "def f():\n    register_cpu_ci(est_time=1, suite='base-a-test-cpu')\n")
    assert parse_registrations(path) == []


def test_suite_naming_helpers():
    assert suite_hardware("base-b-test-2-gpu") == "cuda"
    assert suite_hardware("base-b-test-1-gpu-amd") == "rocm"
    assert suite_hardware("nightly-perf-tpu") == "tpu"
    assert suite_hardware("base-a-test-cpu") == "cpu"
    assert suite_hardware("base-a-test-fpga") is None
    assert [suite_stage(s) for s in ("base-a-test-cpu", "base-c-test-1-gpu", "nightly-perf-cpu")] == [
        "A",
        "C",
        "nightly",
    ]


def test_select_unknown_suite_lists_known(tmp_path):
    write(
        tmp_path,
        "test_1.py",
        "register_cpu_ci(est_time=1, suite='base-a-test-cpu')\nregister_cuda_ci(est_time=1, suite='base-a-test-1-gpu')\n",
    )
    regs = collect(tmp_path / "registered")
    with pytest.raises(ValueError, match=r"unknown suite base-z-test-cpu for --hw cpu; known suites: base-a-test-cpu$"):
        select(regs, "cpu", ["base-z-test-cpu"], nightly=False)
    assert [r.hw for r in select(regs, "cuda", ["base-a-test-1-gpu"], nightly=False)] == ["cuda"]


def test_nightly_registrations_need_the_flag(tmp_path):
    write(tmp_path, "test_n.py", "register_cpu_ci(est_time=1, suite='nightly-perf-cpu', nightly=True)\n")
    regs = collect(tmp_path / "registered")
    assert select(regs, "cpu", ["nightly-perf-cpu"], nightly=False) == []
    assert len(select(regs, "cpu", ["nightly-perf-cpu"], nightly=True)) == 1


def test_repository_registrations_are_valid():
    root = Path(__file__).resolve().parents[1]
    regs = collect(root)
    assert any(r.path.endswith("foundation/test_registry.py") for r in regs)
