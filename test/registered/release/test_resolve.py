"""`python -m release resolve`: its decisions on pip reports recorded from real runs against PyPI (trimmed to
name + version per package; re-record with `python -m release resolve --reports DIR`)."""

import functools
import http.server
import json
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from release.cli import COMMANDS, parser
from release.resolve import (
    STACKS,
    Outcome,
    explain_pip_failure,
    format_table,
    judge,
    judged,
    no_version,
    parse_report,
    requirement_pins,
    sdist_stand_in,
    sdist_versions,
    stand_in_wheel,
    targets,
)
from slime.testing.ci_register import register_cpu_ci

register_cpu_ci(est_time=3, suite="base-a-test-cpu")

REPO = Path(__file__).resolve().parents[3]
FIXTURES = Path(__file__).parent / "fixtures" / "resolve"


def report(name: str) -> dict:
    return json.loads((FIXTURES / name).read_text())


def pins(hardware: str):
    return requirement_pins(REPO / "requirements" / f"constraints-{hardware}.txt")


def test_the_recorded_cuda_resolution_is_the_pinned_stack():
    resolved = parse_report(report("cuda-py3.12.json"))
    assert resolved["sglang"].version == "0.5.10.post1" and resolved["sglang-kernel"].version == "0.4.1"
    assert judge(STACKS["cuda"], resolved, pins("cuda")) == []


def test_a_pin_made_inconsistent_on_purpose_fails_with_the_reason(tmp_path):
    constraints = tmp_path / "constraints-cuda.txt"
    constraints.write_text(
        (REPO / "requirements" / "constraints-cuda.txt").read_text().replace("sglang==0.5.10.post1", "sglang==0.5.23")
    )
    reasons = judge(STACKS["cuda"], parse_report(report("cuda-py3.12.json")), requirement_pins(constraints))
    assert reasons == ["sglang resolved to 0.5.10.post1, constraints-cuda.txt pins 0.5.23"]


def test_the_cpu_extra_on_312_without_the_megatron_pin_was_a_broken_stack():
    """Recorded before constraints-cpu.txt pinned megatron-core: on 3.12 the extra's `>=0.16.1` resolved 0.19.2,
    which the CPU backend's compatibility layer refuses; the pin now makes that a failure with the reason."""
    reasons = judge(STACKS["cpu"], parse_report(report("cpu-py3.12-before.json")), pins("cpu"))
    assert reasons == ["megatron-core resolved to 0.19.2, constraints-cpu.txt pins 0.16.1"]


def test_the_old_unpinned_cuda_extra_resolves_a_stack_nobody_chose_and_is_refused():
    """Recorded for the pre-pin extra (`sglang>=0.5`, no markers) on Python 3.11: pip picked the newest SGLang
    and with it a torch and kernels that no image or test uses."""
    resolved = parse_report(report("cuda-py3.11-before.json"))
    reasons = judge(STACKS["cuda"], resolved, pins("cuda"))
    assert "sglang resolved to 0.5.23, constraints-cuda.txt pins 0.5.10.post1" in reasons
    assert "sglang-kernel resolved to 0.4.10, constraints-cuda.txt pins 0.4.1" in reasons
    assert "torch resolved to 2.14.1, constraints-cuda.txt pins 2.9.1" in reasons
    without_kernel = {n: r for n, r in resolved.items() if n != "sglang-kernel"}
    reasons = judge(STACKS["cuda"], without_kernel, {})
    assert reasons == [
        "sglang-kernel is not in the resolved set",
        "sglang without its kernel package (sglang-kernel) is not a working server",
    ]


def test_a_pin_that_contradicts_the_extra_is_reported_with_both_sides():
    """Recorded: constraints-tpu.txt changed to jax==0.7.2 while the [tpu] extra requires jax[tpu]==0.8.3."""
    output = (FIXTURES / "tpu-jax-pin.out").read_text()
    pins = {"jax": Requirement("jax==0.7.2")}
    why = explain_pip_failure(output, pins, "constraints-tpu.txt")
    assert why == "jax[tpu]==0.8.3 (from slime-rl[tpu]) conflicts with constraints-tpu.txt: jax==0.7.2"
    # jax has wheels that fit: this is a conflict, never mistaken for an sdist-only package
    assert sdist_stand_in(output, "http://127.0.0.1:9/simple/", Path("/nonexistent")) is None


def test_a_transitive_conflict_is_reported_as_the_conflict_pip_names():
    """Recorded: numpy==2.3.0 as a constraint against sglang-jax 0.0.2's numpy~=2.2.6."""
    why = explain_pip_failure((FIXTURES / "tpu-numpy-pin.out").read_text())
    assert why == (
        "conflicting dependencies: sglang-jax 0.0.2 depends on numpy~=2.2.6; "
        "The user requested (constraint) numpy==2.3.0"
    )


def test_the_recorded_tpu_resolution_is_the_stack_the_known_good_sglang_jax_needs():
    resolved = parse_report(report("tpu-py3.12.json"))
    assert judge(STACKS["tpu"], resolved, pins("tpu")) == []
    assert (resolved["jax"].version, resolved["flax"].version) == ("0.10.2", "0.12.4")
    assert "sglang-jax" not in resolved  # the extra leaves it to its known-good commit (README, image)


def test_an_sdist_only_dependency_is_reported_as_such_not_as_unresolvable():
    """Recorded when [tpu] still pinned sglang-jax 0.0.2 from the index, which pulls the sdist-only msgpack-python."""
    before = report("tpu-py3.12-sglang-jax-0.0.2.json")
    outcome = Outcome("tpu", "3.12", "manylinux_2_35_x86_64", ok=False)
    outcome = judged(outcome, STACKS["tpu"], before, {}, {"msgpack-python"})
    assert outcome.ok, outcome.reasons
    assert outcome.sdist_only == ["msgpack-python 0.5.6"]
    assert outcome.versions["jax"] == outcome.versions["jaxlib"] == "0.8.3"
    table = format_table([outcome])
    assert "(sdist-only: msgpack-python 0.5.6)" in table and table.splitlines()[1].endswith("OK")
    # against today's pins that stack is refused, with the reason
    reasons = judge(STACKS["tpu"], parse_report(before), pins("tpu"))
    assert "jax resolved to 0.8.3, constraints-tpu.txt pins 0.10.2" in reasons


def test_jaxlib_must_match_jax():
    resolved = parse_report(report("tpu-py3.12.json"))
    resolved["jaxlib"] = type(resolved["jaxlib"])("0.10.1")
    assert "jaxlib 0.10.1 does not match jax 0.10.2" in judge(STACKS["tpu"], resolved, {})


def test_no_wheel_message_names_the_requirement_and_sdist_versions_are_read_from_file_names():
    output = (
        "ERROR: Could not find a version that satisfies the requirement msgpack-python~=0.5.6 (from sglang-jax) "
        "(from versions: 0.5.0)\nERROR: No matching distribution found for msgpack-python~=0.5.6\n"
    )
    missing = no_version(output)
    assert (str(missing.requirement), missing.parent, missing.listed) == (
        "msgpack-python~=0.5.6",
        "sglang-jax",
        ("0.5.0",),
    )
    assert explain_pip_failure(output) == (
        "no installable file for msgpack-python~=0.5.6 (from sglang-jax) on this Python and platform"
    )
    names = [
        "msgpack-python-0.5.6.tar.gz",
        "msgpack_python-0.4.8.zip",
        "msgpack-python-0.5.6-cp27-none.whl",
        "x-1.tar.gz",
    ]
    assert [str(v) for v in sdist_versions(names, "msgpack_python")] == ["0.4.8", "0.5.6"]


@pytest.fixture
def simple_index(tmp_path):
    page = tmp_path / "simple" / "msgpack-python"
    page.mkdir(parents=True)
    links = ["msgpack-python-0.5.5.tar.gz", "msgpack-python-0.5.6.tar.gz", "msgpack-python-1.0.0.tar.gz"]
    page.joinpath("index.html").write_text("".join(f'<a href="../../f/{n}#sha256=0">{n}</a>' for n in links))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/simple/"
    server.shutdown()


def test_stand_in_wheel_for_the_newest_fitting_sdist(simple_index, tmp_path):
    stderr = "Could not find a version that satisfies the requirement msgpack-python~=0.5.6 (from sglang-jax) (from versions: none)"
    folder = tmp_path / "stand-ins"
    folder.mkdir()
    assert sdist_stand_in(stderr, simple_index, folder) == ("msgpack-python", "0.5.6")
    (wheel,) = folder.iterdir()
    assert wheel.name == "msgpack_python-0.5.6-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as archive:
        assert (
            "Name: msgpack-python\nVersion: 0.5.6" in archive.read("msgpack_python-0.5.6.dist-info/METADATA").decode()
        )
    nothing = "Could not find a version that satisfies the requirement msgpack-python>=2 (from x) (from versions: none)"
    assert sdist_stand_in(nothing, simple_index, folder) is None  # no sdist fits: a real failure
    assert stand_in_wheel(tmp_path, "A.B", "1.0").name == "a_b-1.0-py3-none-any.whl"


def test_targets_cover_each_extra_on_its_pythons_only():
    assert {(t.stack.extra, t.python) for t in targets(None, None)} == {
        ("cpu", "3.11"),
        ("cpu", "3.12"),
        ("cuda", "3.11"),
        ("cuda", "3.12"),
        ("rocm", "3.11"),
        ("rocm", "3.12"),
        ("tpu", "3.12"),
    }
    with pytest.raises(ValueError, match="no target matches"):
        targets(["tpu"], ["3.11"])


def test_every_release_subcommand_carries_its_handler():
    names = [c.name for c in COMMANDS]
    assert len(names) == len(set(names)) and "resolve" in names
    for command in COMMANDS:
        args = parser().parse_args([command.name, *SAMPLE_ARGS.get(command.name, [])])
        assert args.handler is command.handler


SAMPLE_ARGS = {
    "check": ["a.whl"],
    "publish": ["a.whl", "--repository-url", "u"],
    "exists": ["a.whl", "--simple-url", "u"],
    "image-tags": ["--hardware", "cpu", "--channel", "release", "--version", "1.0.0"],
    "image": ["--hardware", "cpu", "--channel", "release", "--version", "1.0.0"],
    "smoke-check": ["--hardware", "cpu", "r.json"],
    "perf": ["--hardware", "cpu", "--out", "o"],
    "ci": ["gate"],
}


def test_the_cli_parser_does_not_import_the_resolver():
    """`python -m release ci ...` runs on bare runners (no `packaging`): building the parser must not need it."""
    code = "import sys; from release.cli import parser; parser(); print(sorted(m for m in sys.modules if m.startswith(('release.resolve', 'packaging'))))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
