"""Build, check and inspect the sdist and wheel.

The build runs on a staged copy of the tracked files (`git ls-files`), with the computed version stamped into
the copy's slime/__init__.py. The working tree is never modified, so `pip install -e .` keeps reporting the
declared version, and nothing untracked (caches, local runs, editor files) can reach a distribution.
"""

from __future__ import annotations

import email.parser
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from release.version import stamp_version
from slime import DISTRIBUTION

# Extras every wheel must advertise: one per hardware target plus the tool extras.
REQUIRED_EXTRAS = ("cpu", "cuda", "rocm", "tpu", "test", "release", "bench")
# Path fragments that must never ship in a distribution.
FORBIDDEN_PARTS = ("__pycache__", ".pytest_cache", ".git", ".venv", "node_modules", ".ipynb_checkpoints")
FORBIDDEN_SUFFIXES = (".pyc", ".pyo", ".orig", ".rej", ".swp", ".log", "~", ".DS_Store")
# Files a source distribution must carry for `pip install` from it to work.
SDIST_REQUIRED = ("pyproject.toml", "README.md", "slime/__init__.py")


def wheel_prefix() -> str:
    """How the distribution name starts a wheel or sdist file name (PEP 427/625: `-` becomes `_`)."""
    return DISTRIBUTION.replace("-", "_")


class BuildError(RuntimeError):
    """One-line failure of a build step."""


@dataclass(frozen=True)
class Distributions:
    wheel: Path
    sdist: Path


def stage_tree(repo: Path, dest: Path, version: str) -> Path:
    """Copy the tracked files of `repo` (working-tree content) into dest/ and stamp `version`."""
    listing = subprocess.run(["git", "-C", str(repo), "ls-files", "-z"], capture_output=True, check=True).stdout
    for rel in filter(None, listing.decode().split("\0")):
        source = repo / rel
        if not source.is_file():  # deleted in the working tree but still in the index
            continue
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)
    stamp_version(dest / "slime" / "__init__.py", version)
    return dest


def build(repo: Path, version: str, outdir: Path, python: str = sys.executable) -> Distributions:
    """sdist, then the wheel built from that sdist (so the sdist is proven installable)."""
    outdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="slime-stage-") as tmp:
        staged = stage_tree(repo, Path(tmp) / "src", version)
        # --no-isolation: build with the setuptools already installed (the `release` extra's environment), so a
        # build needs no network; the workflows install the same extra first.
        result = subprocess.run(
            [python, "-m", "build", "--no-isolation", "--outdir", str(outdir), str(staged)],
            capture_output=True,
            text=True,
        )
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-5:]
        raise BuildError("python -m build failed: " + " | ".join(tail))
    wheels = sorted(outdir.glob(f"{wheel_prefix()}-{version}-*.whl"))
    sdists = sorted(outdir.glob(f"{wheel_prefix()}-{version}.tar.gz"))
    if len(wheels) != 1 or len(sdists) != 1:
        raise BuildError(f"expected one wheel and one sdist for {version} in {outdir}, found {wheels + sdists}")
    return Distributions(wheels[0], sdists[0])


def twine_check(paths: list[Path], python: str = sys.executable) -> None:
    result = subprocess.run(
        [python, "-m", "twine", "check", "--strict", *map(str, paths)], capture_output=True, text=True
    )
    if result.returncode != 0:
        problems = [line.strip() for line in result.stdout.splitlines() if "ERROR" in line or "WARNING" in line]
        raise BuildError("twine check failed: " + " | ".join(problems or [result.stdout.strip()[-300:]]))


def stray_files(names: list[str]) -> list[str]:
    """Names in a distribution that must not ship: tests, caches, VCS and editor leftovers."""
    bad = []
    for name in names:
        parts = name.split("/")
        if (
            any(p in FORBIDDEN_PARTS for p in parts)
            or name.endswith(FORBIDDEN_SUFFIXES)
            or any(p in ("test", "tests") for p in parts[:-1])
            or parts[-1].startswith("test_")
        ):
            bad.append(name)
    return bad


@dataclass(frozen=True)
class WheelReport:
    version: str
    files: tuple[str, ...]
    extras: tuple[str, ...]
    requires: tuple[str, ...]
    console_scripts: tuple[str, ...]


def read_wheel(wheel: Path) -> WheelReport:
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        dist_info = {n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info")}
        if len(dist_info) != 1:
            raise BuildError(f"{wheel.name}: expected one .dist-info folder, found {sorted(dist_info)}")
        info = dist_info.pop()
        metadata = email.parser.Parser().parsestr(archive.read(f"{info}/METADATA").decode())
        entry_points = archive.read(f"{info}/entry_points.txt").decode() if f"{info}/entry_points.txt" in names else ""
    scripts, section = [], ""
    for line in entry_points.splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line.strip("[]")
        elif section == "console_scripts" and "=" in line:
            scripts.append(line.split("=")[0].strip())
    return WheelReport(
        version=metadata["Version"],
        files=tuple(names),
        extras=tuple(metadata.get_all("Provides-Extra") or ()),
        requires=tuple(metadata.get_all("Requires-Dist") or ()),
        console_scripts=tuple(scripts),
    )


def inspect_wheel(wheel: Path, version: str) -> list[str]:
    """Problems with a built wheel; empty when it is fit to publish."""
    report = read_wheel(wheel)
    problems = []
    if report.version != version:
        problems.append(f"{wheel.name}: metadata version {report.version}, expected {version}")
    tops = {n.split("/")[0] for n in report.files}
    unexpected = sorted(t for t in tops if t != "slime" and not t.endswith(".dist-info"))
    if unexpected:
        problems.append(f"{wheel.name}: unexpected top-level entries {unexpected}")
    for name in stray_files(list(report.files)):
        problems.append(f"{wheel.name}: stray file {name}")
    for extra in REQUIRED_EXTRAS:
        if extra not in report.extras:
            problems.append(f"{wheel.name}: extra [{extra}] missing from the metadata")
    if not any("torch" in r and 'extra == "cpu"' in r for r in report.requires):
        problems.append(f"{wheel.name}: the [cpu] extra does not require torch")
    if "slime" not in report.console_scripts:
        problems.append(f"{wheel.name}: console script `slime` missing")
    if "slime/__init__.py" not in report.files:
        problems.append(f"{wheel.name}: slime/__init__.py missing")
    return problems


def inspect_sdist(sdist: Path) -> list[str]:
    with tarfile.open(sdist) as archive:
        names = archive.getnames()
    root = names[0].split("/")[0] if names else ""
    relative = [n[len(root) + 1 :] for n in names if n.startswith(root + "/")]
    problems = [f"{sdist.name}: stray file {n}" for n in stray_files(relative) if not n.startswith("test/")]
    problems += [f"{sdist.name}: {req} missing" for req in SDIST_REQUIRED if req not in relative]
    return problems
