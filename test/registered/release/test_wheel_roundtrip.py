"""Build -> check -> publish to a local pypiserver with htpasswd -> install into a fresh venv from that index
only -> `slime env --json`. Also: uploads without or with wrong credentials, and re-uploads, are refused.

The index holds slime and its core dependencies (numpy, packaging) only. The [cpu] extra's stack (torch,
megatron-core, ...) is not uploaded: installing `slime-rl[cpu]` from this index must fail naming torch, which
proves pip had no public index to fall back to; the wheel's metadata is checked for the extra instead.
"""

import datetime
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from importlib.metadata import version as installed_version
from pathlib import Path

import pytest
from passlib.apache import HtpasswdFile

from release.build import build, inspect_sdist, inspect_wheel, read_wheel, twine_check
from release.publish import PublishError, publish
from release.version import GitState, compute_version, declared_version
from slime.net import free_port
from slime.testing.ci_register import register_cpu_ci

register_cpu_ci(est_time=60, suite="base-c-test-cpu")

REPO = Path(__file__).resolve().parents[3]
BIN = Path(sys.executable).parent
VERSION = compute_version(
    GitState(None, 1, "0" * 40, False), "nightly", declared_version(REPO), datetime.date(2025, 3, 4)
)


def wheel_from_installed(dist_name: str, out_dir: Path) -> Path:
    """Pack an installed distribution back into a wheel (its files per RECORD, its WHEEL tags, a fresh RECORD
    with hashes): the dependencies the index serves come from this venv, so the test needs no network."""
    import base64
    import hashlib
    import zipfile
    from importlib.metadata import distribution

    dist = distribution(dist_name)
    site = Path(dist.locate_file(""))
    metadata = next(f for f in dist.files if f.name == "METADATA" and f.parent.name.endswith(".dist-info"))
    info = site / metadata.parent
    tags = [
        line.split(":", 1)[1].strip() for line in (info / "WHEEL").read_text().splitlines() if line.startswith("Tag:")
    ]
    name = dist.metadata["Name"].replace("-", "_")
    wheel = out_dir / f"{name}-{dist.version}-{tags[0]}.whl"
    skip = {"INSTALLER", "REQUESTED", "direct_url.json", "RECORD"}
    records = []
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as archive:
        for file in dist.files or []:
            rel = file.as_posix()
            if (
                rel.startswith("..")
                or "__pycache__" in rel
                or (rel.startswith(info.name + "/") and Path(rel).name in skip)
            ):
                continue
            data = (site / rel).read_bytes()
            archive.writestr(rel, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            records.append(f"{rel},sha256={digest},{len(data)}")
        records.append(f"{info.name}/RECORD,,")
        archive.writestr(f"{info.name}/RECORD", "\n".join(records) + "\n")
    return wheel


def clean_pip_env(tmp_path: Path) -> dict:
    """pip with no package source but the command line's index. pip always reads the machine-wide config
    (/etc/pip.conf, /etc/xdg/pip/...), so a config file named by PIP_CONFIG_FILE, read after those, blanks
    every other source: extra indexes, find-links, constraints."""
    config = tmp_path / "pip.conf"
    config.write_text("[global]\nextra-index-url =\nfind-links =\nconstraint =\n")
    # PYTHONPATH goes too: the suite runner points it at the checkout, which would shadow the installed wheel.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") and k != "PYTHONPATH"}
    env.update(PIP_CONFIG_FILE=str(config), PIP_DISABLE_PIP_VERSION_CHECK="1", OMP_NUM_THREADS="1")
    return env


@pytest.fixture(scope="module")
def dists(tmp_path_factory):
    return build(REPO, VERSION, tmp_path_factory.mktemp("dist"))


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    root = tmp_path_factory.mktemp("index")
    packages = root / "packages"
    packages.mkdir()
    htpasswd = HtpasswdFile(str(root / "htpasswd"), new=True)
    htpasswd.set_password("maintainer", "s3cret")
    htpasswd.save()
    port = free_port()
    server = subprocess.Popen(
        [
            str(BIN / "pypi-server"),
            "run",
            "-i",
            "127.0.0.1",
            "-p",
            str(port),
            "-P",
            str(root / "htpasswd"),
            "-a",
            "update",
            "--disable-fallback",
            str(packages),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            urllib.request.urlopen(url + "/simple/", timeout=1)
            break
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.1)
    else:
        server.kill()
        raise RuntimeError("pypiserver did not come up: " + server.stderr.read().decode()[-500:])
    yield url, packages
    server.terminate()
    server.wait(timeout=10)


def test_built_distributions_pass_twine_and_inspection(dists):
    twine_check([dists.wheel, dists.sdist])
    assert inspect_wheel(dists.wheel, VERSION) == []
    assert inspect_sdist(dists.sdist) == []
    report = read_wheel(dists.wheel)
    assert report.version == VERSION
    assert {"cpu", "cuda", "rocm", "tpu", "test", "release"} <= set(report.extras)
    assert any(r.startswith("torch") and 'extra == "cpu"' in r for r in report.requires)
    assert not [n for n in report.files if n.startswith(("test/", "release/", "docker/"))]
    # the working tree is untouched: the editable install still reports the declared version
    assert declared_version(REPO) in (REPO / "slime" / "__init__.py").read_text()


def test_upload_refusals_and_success(dists, index):
    url, _ = index
    files = [dists.wheel, dists.sdist]
    with pytest.raises(PublishError, match="credentials missing: set TWINE_USERNAME and TWINE_PASSWORD"):
        publish(files, url, None, False, environ={})
    # The index itself refuses an anonymous upload, not only our client.
    request = urllib.request.Request(url + "/", data=b":action=file_upload", method="POST")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code in (401, 403)
    wrong = dict(os.environ, TWINE_USERNAME="maintainer", TWINE_PASSWORD="wrong")
    with pytest.raises(PublishError, match="refused: .*403"):
        publish(files, url, None, False, environ=wrong)

    right = dict(os.environ, TWINE_USERNAME="maintainer", TWINE_PASSWORD="s3cret")
    assert publish(files, url, url + "/simple/", False, environ=right).startswith("uploaded")
    with pytest.raises(PublishError, match=f"version {VERSION} already exists"):
        publish(files, url, url + "/simple/", False, environ=right)
    with pytest.raises(PublishError, match="refused"):  # without the pre-check the index refuses it too
        publish([dists.wheel], url, None, False, environ=right)
    assert publish(files, url, url + "/simple/", True, environ=right).startswith("skipped")

    cli = subprocess.run(
        [sys.executable, "-m", "release", "publish", "--repository-url", url, str(dists.wheel)],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if not k.startswith("TWINE_")},
    )
    assert cli.returncode == 2 and cli.stderr.strip().count("\n") == 0 and "credentials missing" in cli.stderr


def test_install_from_the_index_only_and_run_slime_env(dists, index, tmp_path):
    url, packages = index
    right = dict(os.environ, TWINE_USERNAME="maintainer", TWINE_PASSWORD="s3cret")
    publish([dists.wheel, dists.sdist], url, url + "/simple/", True, environ=right)
    # slime's own dependencies, packed from this venv's installed copies and served by the index
    for dependency in ("numpy", "packaging"):
        assert wheel_from_installed(dependency, packages).name.startswith(
            f"{dependency}-{installed_version(dependency)}-"
        )

    venv, env = tmp_path / "fresh", clean_pip_env(tmp_path)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, env=env)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--retries", "0", "--index-url", f"{url}/simple/"]
    listed = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "config", "list"], capture_output=True, text=True, env=env
    )
    assert "global.extra-index-url=''" in listed.stdout and "global.find-links=''" in listed.stdout, listed.stdout
    extra = subprocess.run([*pip, "--dry-run", f"slime-rl[cpu]=={VERSION}"], capture_output=True, text=True, env=env)
    # no public index behind this one: the [cpu] stack is not found
    assert extra.returncode != 0 and "No matching distribution found for torch" in extra.stderr, extra.stderr[-800:]

    installed = subprocess.run([*pip, f"slime-rl=={VERSION}"], capture_output=True, text=True, env=env)
    assert installed.returncode == 0, installed.stderr[-1500:]
    env_run = subprocess.run(
        [str(venv / "bin" / "slime"), "env", "--json"], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    report = json.loads(env_run.stdout)
    assert report["slime"] == VERSION
    assert [b["name"] for b in report["backends"]] == ["cuda", "rocm", "tpu", "cpu"]
    # torch is not installed in the fresh venv, so no backend is usable and the report says what is missing
    assert env_run.returncode == 1 and report["selected"] is None
    assert "torch not installed" in report["extras"]["cpu"]["problems"]
    # this venv's Python is older than the TPU stack needs: `slime env` says so instead of "satisfied"
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    if sys.version_info < (3, 12):
        assert report["extras"]["tpu"]["problems"][0].startswith(f"Python {python} is too old for this stack")


def test_publish_refuses_an_index_page_that_lists_versions_we_never_made(dists, index):
    url, packages = index
    right = dict(os.environ, TWINE_USERNAME="maintainer", TWINE_PASSWORD="s3cret")
    publish([dists.wheel, dists.sdist], url, url + "/simple/", True, environ=right)  # ours only: allowed
    # someone else's release under the same name (a version our tags and nightlies never produce)
    (packages / "slime_rl-1.0.tar.gz").write_bytes(dists.sdist.read_bytes())
    with pytest.raises(PublishError, match=r"lists files our version policy could not have produced \(slime_rl-1.0"):
        publish([dists.wheel, dists.sdist], url, url + "/simple/", True, environ=right)
    cli = subprocess.run(
        [sys.executable, "-m", "release", "exists", "--simple-url", url + "/simple/", str(dists.wheel)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert cli.returncode == 2 and "belongs to another project" in cli.stderr, cli.stderr
    (packages / "slime_rl-1.0.tar.gz").unlink()
