"""`release resolve`'s pip run end to end, against a local simple index (no network): the real pip with the real
flags, its report read back, an sdist-only dependency carried by a stand-in, and a pin made inconsistent on
purpose failing with the reason."""

import functools
import http.server
import sys
import threading
import zipfile
from pathlib import Path

import pytest

from release.resolve import Options, Stack, Target, resolve_target
from slime.testing.ci_register import register_cpu_ci

register_cpu_ci(est_time=12, suite="base-b-test-cpu")

PYTHON = f"{sys.version_info.major}.{sys.version_info.minor}"  # pip evaluates markers with this interpreter
STACK = Stack("fake", "constraints-fake.txt", ("core", "helper"), (PYTHON,))


def write_wheel(folder: Path, name: str, version: str, requires: list[str] = (), extras: list[str] = ()) -> Path:
    stem = f"{name}-{version}"
    lines = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"]
    lines += [f"Provides-Extra: {e}" for e in extras] + [f"Requires-Dist: {r}" for r in requires]
    wheel = folder / f"{stem}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(f"{stem}.dist-info/METADATA", "\n".join(lines) + "\n")
        archive.writestr(f"{stem}.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        archive.writestr(f"{stem}.dist-info/RECORD", "")
    return wheel


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    """core 2.0 and 3.0 as wheels, helper 0.5 as an sdist only; served as a PEP 503 simple index."""
    root = tmp_path_factory.mktemp("index")
    files = root / "files"
    files.mkdir()
    write_wheel(files, "core", "2.0")
    write_wheel(files, "core", "3.0")
    (files / "helper-0.5.tar.gz").write_bytes(b"not needed: pip never builds it in a dry run with wheels only")
    for project in ("core", "helper"):
        page = root / "simple" / project
        page.mkdir(parents=True)
        names = sorted(f.name for f in files.iterdir() if f.name.startswith(project + "-"))
        page.joinpath("index.html").write_text("".join(f'<a href="../../files/{n}">{n}</a>\n' for n in names))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    app = write_wheel(root, "app", "1.0", ["core==2.0; extra == 'fake'", "helper; extra == 'fake'"], ["fake"])
    yield f"http://127.0.0.1:{server.server_address[1]}/simple/", app
    server.shutdown()


def resolve_with(pins: str, index, tmp_path):
    url, app = index
    (tmp_path / STACK.constraints).write_text(pins)
    return resolve_target(sys.executable, Target(STACK, PYTHON), app, tmp_path, [url], Options(url, timeout=300))


def test_pinned_stack_resolves_with_the_sdist_only_dependency_reported(index, tmp_path):
    outcome = resolve_with("# the fake stack\ncore==2.0\n", index, tmp_path)
    assert outcome.ok, outcome.reasons
    assert outcome.versions == {"core": "2.0", "helper": "0.5"}
    assert outcome.sdist_only == ["helper 0.5"]


def test_a_pin_made_inconsistent_on_purpose_fails_with_the_reason(index, tmp_path):
    outcome = resolve_with("core==3.0\n", index, tmp_path)
    assert not outcome.ok
    (reason,) = outcome.reasons
    assert reason == (
        'conflicting dependencies: app[fake] 1.0 depends on core==2.0; extra == "fake"; '
        "The user requested (constraint) core==3.0"
    ), reason
