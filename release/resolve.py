"""`python -m release resolve`: does every extra resolve, on every Python it supports, to a working stack?

For each (extra, Python, platform) it runs pip's own resolver as a dry run with `--report` against the index,
constrained by requirements/constraints-<hw>.txt, and judges the resolved set: every package of that stack
is there, each at the pinned version, and the pieces agree (jaxlib = jax). A dependency that ships only an
sdist cannot be resolved for a foreign Python/platform (pip then needs wheels only); it gets a metadata-only
stand-in wheel, the resolution is retried, and the table says which packages are built from source at install.

The decisions (`judge`, `explain_pip_failure`) are pure functions over pip's report and stderr, unit-tested on
recorded reports in test/registered/release/test_resolve.py; running pip needs the index, so this command runs
in the nightly and release workflows (before anything is published), not in the always-on CPU suites.
"""

from __future__ import annotations

import html.parser
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

from release.pins import read_pins
from slime import DISTRIBUTION

PYPI_SIMPLE = "https://pypi.org/simple/"
PYTORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
# pip matches --platform tags literally: a glibc-2.35 x86-64 Linux (Ubuntu 22.04, the images) runs every
# manylinux tag from 2_17 (= manylinux2014) up.
X86_64 = (*(f"manylinux_2_{minor}_x86_64" for minor in range(35, 16, -1)), "manylinux2014_x86_64")
SUPPORTED_PYTHONS = ("3.11", "3.12")  # what pyproject's requires-python admits and CI runs
MAX_STAND_INS = 6  # more sdist-only dependencies than this in one stack is itself worth a failure


@dataclass(frozen=True)
class Stack:
    """What a working stack of one extra is: the packages that must resolve, and the Pythons it supports."""

    extra: str
    constraints: str  # requirements/<file>: the pins of this hardware
    required: tuple[str, ...]
    pythons: tuple[str, ...]
    note: str = ""  # printed under the table: what this resolution cannot show


STACKS = {
    "cpu": Stack(
        "cpu",
        "constraints-cpu.txt",
        ("torch", "megatron-core", "transformers", "safetensors", "ray"),
        ("3.11", "3.12"),
        "cpu: torch resolves against the registry's build; an install takes the CPU build of the same version "
        f"from the PyTorch CPU index ({PYTORCH_CPU_INDEX}), which is not the registry (--cpu-torch-index uses it)",
    ),
    "cuda": Stack(
        "cuda",
        "constraints-cuda.txt",
        ("sglang", "sglang-kernel", "flashinfer-python", "torch", "megatron-core", "ray", "transformers"),
        ("3.11", "3.12"),
    ),
    "rocm": Stack(
        "rocm",
        "constraints-rocm.txt",
        ("megatron-core", "ray", "transformers", "triton"),
        ("3.11", "3.12"),
        "rocm: torch and SGLang for ROCm are not on the registry; they come from the ROCm image",
    ),
    "tpu": Stack(
        "tpu",
        "constraints-tpu.txt",
        ("jax", "jaxlib", "libtpu", "flax", "optax", "transformers", "torch"),
        ("3.12",),
        "tpu: torch is resolved from the registry here; the TPU install takes its CPU build from the PyTorch CPU index."
        " sglang-jax is not in the extra (installed from its known-good commit, which the index cannot serve); its"
        " requirements at that commit are checked against constraints-tpu.txt by test_install_agreement.py",
    ),
}


@dataclass(frozen=True)
class Resolved:
    version: str
    sdist_only: bool = False


@dataclass
class Outcome:
    extra: str
    python: str
    platform: str
    ok: bool
    versions: dict[str, str] = field(default_factory=dict)  # key packages of the stack
    reasons: list[str] = field(default_factory=list)
    sdist_only: list[str] = field(default_factory=list)  # "name version" built from source at install


def requirement_pins(path: Path) -> dict[str, Requirement]:
    """The constraints file as `name==version` requirements, by canonical name."""
    return {name: Requirement(f"{name}=={version}") for name, version in read_pins(path).items()}


def pinned_version(req: Requirement) -> str:
    return next(iter(req.specifier)).version


def parse_report(report: dict, stand_ins: set[str] = frozenset()) -> dict[str, Resolved]:
    """pip's installation report -> canonical name -> version (stand-ins marked as sdist-only)."""
    resolved = {}
    for item in report.get("install", []):
        meta = item["metadata"]
        name = canonicalize_name(meta["name"])
        resolved[name] = Resolved(meta["version"], name in stand_ins)
    return resolved


def judge(stack: Stack, resolved: dict[str, Resolved], pins: dict[str, Requirement]) -> list[str]:
    """Why the resolved set is not a working stack of `stack`; empty when it is."""
    reasons = []
    for name in stack.required:
        if canonicalize_name(name) not in resolved:
            reasons.append(f"{name} is not in the resolved set")
    for name, pin in sorted(pins.items()):
        got = resolved.get(name)
        if got is None:
            continue
        if not pin.specifier.contains(got.version, prereleases=True):
            reasons.append(f"{name} resolved to {got.version}, {stack.constraints} pins {pinned_version(pin)}")
    jax, jaxlib = resolved.get("jax"), resolved.get("jaxlib")
    if jax and jaxlib and Version(jax.version).release != Version(jaxlib.version).release:
        reasons.append(f"jaxlib {jaxlib.version} does not match jax {jax.version}")
    if stack.extra == "cuda" and "sglang" in resolved and "sglang-kernel" not in resolved:
        reasons.append("sglang without its kernel package (sglang-kernel) is not a working server")
    return reasons


CONFLICT_START = "The conflict is caused by:"
NO_VERSION = re.compile(
    r"Could not find a version that satisfies the requirement (?P<req>.+?)(?: \(from (?P<parent>[^()]+)\))?"
    r" \(from versions: (?P<listed>[^)]*)\)"
)


@dataclass(frozen=True)
class NoVersion:
    """pip's "Could not find a version that satisfies the requirement X (from P) (from versions: ...)"."""

    requirement: Requirement
    parent: str | None
    listed: tuple[str, ...]  # the versions pip found files for (wheels for this Python and platform)

    @property
    def fitting_listed(self) -> list[str]:
        return [v for v in self.listed if self.requirement.specifier.contains(v, prereleases=True)]


def no_version(output: str) -> NoVersion | None:
    match = NO_VERSION.search(output)
    if not match:
        return None
    try:
        req = Requirement(match.group("req").split(";", 1)[0].strip())
    except ValueError:
        return None
    listed = tuple(v.strip() for v in match.group("listed").split(",") if v.strip() and v.strip() != "none")
    return NoVersion(req, match.group("parent"), listed)


def explain_pip_failure(output: str, pins: dict[str, Requirement] | None = None, constraints: str = "") -> str:
    """One line saying why pip could not resolve: the conflict pip names, the pin that excludes a requirement,
    or the package it found no file for."""
    lines = [line.strip() for line in output.splitlines()]
    if CONFLICT_START in lines:
        causes = []
        for line in lines[lines.index(CONFLICT_START) + 1 :]:
            if not line or line.startswith("To fix this"):
                break
            causes.append(line)
        return "conflicting dependencies: " + "; ".join(causes)
    missing = no_version(output)
    if missing is not None:
        req, parent = missing.requirement, f" (from {missing.parent})" if missing.parent else ""
        pin = (pins or {}).get(canonicalize_name(req.name))
        if missing.fitting_listed and pin is not None and not req.specifier.contains(pinned_version(pin)):
            return f"{req}{parent} conflicts with {constraints or 'the constraints'}: {pin}"
        if missing.fitting_listed:
            return f"{req}{parent} has files, but another requirement or constraint excludes them"
        return f"no installable file for {req}{parent} on this Python and platform"
    errors = [line for line in lines if line.startswith("ERROR:")]
    return errors[-1] if errors else (lines[-1] if lines else "pip failed without output")


class _Anchors(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.files: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            self.files.append((dict(attrs).get("href") or "").split("#")[0].rsplit("/", 1)[-1])


def sdist_versions(file_names: list[str], name: str) -> list[Version]:
    """Versions for which the index's file list for `name` has an sdist (.tar.gz or .zip)."""
    found = set()
    prefix = canonicalize_name(name)
    for file_name in file_names:
        stem = re.sub(r"\.(tar\.gz|zip)$", "", file_name)
        if stem == file_name or "-" not in stem:
            continue
        project, _, version = stem.rpartition("-")
        if canonicalize_name(project) != prefix:
            continue
        try:
            found.add(Version(version))
        except InvalidVersion:
            continue
    return sorted(found)


def index_files(index_url: str, name: str, timeout: float = 60.0) -> list[str]:
    url = index_url.rstrip("/") + f"/{canonicalize_name(name)}/"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            page = response.read().decode()
    except (urllib.error.URLError, TimeoutError):
        return []
    parser = _Anchors()
    parser.feed(page)
    return parser.files


def stand_in_wheel(folder: Path, name: str, version: str) -> Path:
    """A metadata-only wheel for an sdist-only dependency, so the resolution of everything else can go on."""
    stem = f"{canonicalize_name(name).replace('-', '_')}-{version}"
    wheel = folder / f"{stem}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(f"{stem}.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        archive.writestr(
            f"{stem}.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: slime-release\nRoot-Is-Purelib: true\n"
        )
        archive.writestr(f"{stem}.dist-info/RECORD", "")
    return wheel


def sdist_stand_in(output: str, index_url: str, folder: Path) -> tuple[str, str] | None:
    """When pip found no wheel that fits a requirement but the index has an sdist that does: write its stand-in.
    A requirement with fitting wheels that something else excluded is a conflict, not an sdist-only package."""
    missing = no_version(output)
    if missing is None or missing.fitting_listed:
        return None
    req = missing.requirement
    fitting = [v for v in sdist_versions(index_files(index_url, req.name), req.name) if req.specifier.contains(v)]
    if not fitting:
        return None
    stand_in_wheel(folder, req.name, str(fitting[-1]))
    return canonicalize_name(req.name), str(fitting[-1])


@dataclass(frozen=True)
class Target:
    stack: Stack
    python: str
    platforms: tuple[str, ...] = X86_64

    @property
    def platform_label(self) -> str:
        return "manylinux_2_35_x86_64" if self.platforms == X86_64 else self.platforms[0]


@dataclass(frozen=True)
class Options:
    index_url: str = PYPI_SIMPLE
    cpu_torch_index: str | None = None  # extra index for the CPU torch build (cpu and tpu rows)
    interpreters: tuple[str, ...] = ()  # interpreters to use beyond python3.X on PATH
    timeout: float = 900.0  # seconds per pip run
    reports_dir: Path | None = None  # keep pip's report of each target here


def pip_environment() -> dict[str, str]:
    """The caller's environment without pip settings: only the index given on the command line counts."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def interpreter_version(executable: str) -> str | None:
    """The version ("3.12") of an interpreter that runs and has pip; None otherwise."""
    probe = "import sys, pip; print('%d.%d' % sys.version_info[:2])"
    try:
        result = subprocess.run([executable, "-c", probe], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def find_interpreters(pythons: set[str], explicit: list[str]) -> dict[str, str]:
    """Version -> interpreter with pip. pip evaluates the extras' markers (python_version) with the interpreter
    that runs it, whatever --python-version says, so each Python needs its own interpreter."""
    found: dict[str, str] = {}
    candidates = [*explicit, sys.executable, *(shutil.which(f"python{v}") or "" for v in sorted(pythons))]
    for executable in filter(None, candidates):
        version = interpreter_version(executable)
        if version in pythons and version not in found:
            found[version] = executable
    return found


def pip_command(
    python: str, target: Target, wheel: Path, constraints: Path, report: Path, work: Path, index: list[str]
) -> list:
    # not --quiet: pip names the conflicting requirements on its info output
    command = [python, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--progress-bar", "off"]
    command += ["--report", str(report), "--target", str(work / "target"), "--python-version", target.python]
    command += ["--only-binary=:all:", "--index-url", index[0], "--find-links", str(work / "stand-ins")]
    for extra_index in index[1:]:
        command += ["--extra-index-url", extra_index]
    for platform in target.platforms:
        command += ["--platform", platform]
    return [*command, "-c", str(constraints), f"{wheel}[{target.stack.extra}]"]


def resolve_target(
    python: str, target: Target, wheel: Path, requirements: Path, index: list[str], options: Options
) -> Outcome:
    """Run pip for one target (retrying past sdist-only dependencies) and judge what it resolved."""
    stack = target.stack
    constraints = requirements / stack.constraints
    outcome = Outcome(stack.extra, target.python, target.platform_label, ok=False)
    pins = requirement_pins(constraints)
    stand_ins: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix=f"resolve-{stack.extra}-") as tmp:
        work = Path(tmp)
        (work / "stand-ins").mkdir()
        report = work / "report.json"
        for _ in range(MAX_STAND_INS + 1):
            command = pip_command(python, target, wheel, constraints, report, work, index)
            try:
                result = subprocess.run(
                    command, capture_output=True, text=True, env=pip_environment(), timeout=options.timeout
                )
            except subprocess.TimeoutExpired:
                outcome.reasons.append(f"pip did not finish within {options.timeout:.0f} s")
                return outcome
            if result.returncode == 0:
                break
            output = result.stdout + result.stderr
            found = sdist_stand_in(output, index[0], work / "stand-ins")
            if found is None or found[0] in stand_ins:
                outcome.reasons.append(explain_pip_failure(output, pins, stack.constraints))
                outcome.sdist_only = [f"{n} {v}" for n, v in stand_ins.items()]
                return outcome
            stand_ins[found[0]] = found[1]
        else:
            outcome.reasons.append(f"more than {MAX_STAND_INS} sdist-only dependencies")
            return outcome
        if options.reports_dir is not None:
            options.reports_dir.mkdir(parents=True, exist_ok=True)
            shutil.copy(report, options.reports_dir / f"{stack.extra}-py{target.python}.json")
        return judged(outcome, stack, json.loads(report.read_text()), pins, set(stand_ins))


def judged(outcome: Outcome, stack: Stack, report: dict, pins: dict[str, Requirement], stand_ins: set[str]) -> Outcome:
    resolved = parse_report(report, stand_ins)
    outcome.versions = {
        n: resolved[canonicalize_name(n)].version for n in stack.required if canonicalize_name(n) in resolved
    }
    outcome.sdist_only = sorted(f"{n} {r.version}" for n, r in resolved.items() if r.sdist_only)
    outcome.reasons = judge(stack, resolved, pins)
    outcome.ok = not outcome.reasons
    return outcome


def targets(extras: list[str] | None, pythons: list[str] | None) -> list[Target]:
    chosen = []
    for name, stack in STACKS.items():
        if extras and name not in extras:
            continue
        chosen += [Target(stack, py) for py in stack.pythons if not pythons or py in pythons]
    if not chosen:
        raise ValueError(f"no target matches --extra {extras} --python {pythons}; extras: {', '.join(STACKS)}")
    return chosen


def build_wheel(repo: Path, outdir: Path) -> Path:
    """The project's wheel as it stands (the resolver reads the extras from its metadata)."""
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(outdir)]
    result = subprocess.run([*command, str(repo)], capture_output=True, text=True)
    wheels = sorted(outdir.glob(f"{DISTRIBUTION.replace('-', '_')}-*.whl"))
    if result.returncode != 0 or len(wheels) != 1:
        raise ValueError(f"could not build the wheel of {repo}: {(result.stderr or result.stdout).strip()[-300:]}")
    return wheels[0]


def format_table(outcomes: list[Outcome]) -> str:
    rows = [("extra", "python", "platform", "key versions", "result")]
    for o in outcomes:
        versions = " ".join(f"{n}={v}" for n, v in o.versions.items()) or "-"
        if o.sdist_only:
            versions += " (sdist-only: " + ", ".join(o.sdist_only) + ")"
        rows.append((o.extra, o.python, o.platform, versions, "OK" if o.ok else "FAIL: " + "; ".join(o.reasons)))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = []
    for row in rows:
        lines.append("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row[:4])) + "  " + row[4])
    return "\n".join(lines)


def run(repo: Path, extras: list[str] | None, pythons: list[str] | None, options: Options) -> tuple[list, list]:
    """Resolve every selected target; returns the outcomes and the notes that belong under the table."""
    chosen = targets(extras, pythons)
    interpreters = find_interpreters({t.python for t in chosen}, list(options.interpreters))
    outcomes = []
    with tempfile.TemporaryDirectory(prefix="resolve-wheel-") as tmp:
        wheel = build_wheel(repo, Path(tmp))
        for target in chosen:
            python = interpreters.get(target.python)
            if python is None:
                reason = f"no Python {target.python} interpreter with pip found (pass --interpreter PATH)"
                outcomes.append(
                    Outcome(target.stack.extra, target.python, target.platform_label, False, reasons=[reason])
                )
                continue
            index = [options.index_url]
            if options.cpu_torch_index and target.stack.extra in ("cpu", "tpu"):
                index.append(options.cpu_torch_index)
            outcomes.append(resolve_target(python, target, wheel, repo / "requirements", index, options))
    stacks = {t.stack.extra: t.stack for t in chosen}.values()
    notes = [stack.note for stack in stacks if stack.note]
    notes += [
        f"{s.extra}: Python {', '.join(sorted(set(SUPPORTED_PYTHONS) - set(s.pythons)))} not supported "
        "(the extra's markers leave its stack out there; README and `slime env` say so)"
        for s in stacks
        if set(SUPPORTED_PYTHONS) - set(s.pythons)
    ]
    if options.cpu_torch_index:
        notes = [n for n in notes if not n.startswith(("cpu:", "tpu:"))]
    return outcomes, notes
