"""Docker images: one Dockerfile per hardware target, their tags, and the smoke check each image must pass."""

from __future__ import annotations

import datetime
import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from release.pins import REQUIREMENTS, canonical, constraints_file, hardware_pins
from release.version import TAG_PATTERN

DEFAULT_REPOSITORY = "ghcr.io/slime-rl/slime"


@dataclass(frozen=True)
class ImageSpec:
    hardware: str  # the slime backend the image is for; also `slime env --hardware <hardware>`
    dockerfile: str  # relative to the repository root
    # build arg -> (package pinned in requirements/constraints-<hardware>.txt, how its version is written)
    pinned_args: tuple[tuple[str, str, str], ...]
    fixed_args: tuple[tuple[str, str], ...]  # build args that are no package version (Python, git refs)
    run_flags: tuple[str, ...]  # `docker run` flags that expose the device to the container
    runner: tuple[str, ...]  # workflow runs-on labels of a machine with that hardware and a Docker engine


IMAGES: dict[str, ImageSpec] = {
    "cpu": ImageSpec(
        "cpu",
        "docker/cpu.Dockerfile",
        (("TORCH_VERSION", "torch", "{}"),),
        (("PYTHON_VERSION", "3.11"),),
        (),
        ("ubuntu-24.04",),
    ),
    "cuda": ImageSpec(
        "cuda",
        "docker/cuda.Dockerfile",
        # the SGLang image tag is the sglang release: v0.5.10.post1 (CUDA 12.9, Python 3.12)
        (("SGLANG_IMAGE_TAG", "sglang", "v{}"), ("MEGATRON_CORE_VERSION", "megatron-core", "{}")),
        (("DEEPEP_REF", "v1.2.1"),),
        ("--gpus", "all", "--ipc", "host"),
        ("self-hosted", "linux", "x64", "nvidia-1"),
    ),
    "rocm": ImageSpec(
        "rocm",
        "docker/rocm.Dockerfile",
        (("SGLANG_IMAGE_TAG", "sglang", "v{}-rocm720-mi30x"), ("MEGATRON_CORE_VERSION", "megatron-core", "{}")),
        (),
        ("--device", "/dev/kfd", "--device", "/dev/dri", "--group-add", "video", "--ipc", "host"),
        ("self-hosted", "linux", "x64", "amd-1"),
    ),
    "tpu": ImageSpec(
        "tpu",
        "docker/tpu.Dockerfile",
        (),  # every version from requirements/constraints-tpu.txt, installed with pip -c (dockerfile_pin_problems)
        (("PYTHON_VERSION", "3.12"),),
        ("--privileged", "--net", "host"),
        ("self-hosted", "linux", "x64", "tpu-1"),
    ),
}


def build_args(hardware: str, requirements: Path = REQUIREMENTS) -> dict[str, str]:
    """The image's build args: package versions from the hardware's constraints file, then the fixed ones."""
    spec = IMAGES[hardware]
    pins = hardware_pins(hardware, requirements)
    args = {}
    for arg, package, form in spec.pinned_args:
        if package not in pins:
            raise ValueError(f"{constraints_file(hardware, requirements)} pins no {package} (build arg {arg})")
        args[arg] = form.format(pins[package])
    return {**args, **dict(spec.fixed_args)}


PIP_OPTIONS_WITH_VALUES = ("-c", "--constraint", "-i", "--index-url", "--extra-index-url", "-r", "--requirement")


def pip_installs(dockerfile_text: str) -> list[list[str]]:
    """The arguments of every `pip install` in a Dockerfile's RUN lines (continuations joined, `&&` split)."""
    joined = re.sub(r"\\\n", " ", dockerfile_text)
    installs = []
    for line in joined.splitlines():
        if not line.startswith("RUN "):
            continue
        for command in line[4:].split("&&"):
            words = shlex.split(command)
            if words[:2] == ["pip", "install"]:
                installs.append(words[2:])
    return installs


def dockerfile_pin_problems(
    dockerfile_text: str, pins: dict[str, str], constraints_name: str, from_commits: tuple[str, ...] = ()
) -> list[str]:
    """Where a Dockerfile that installs with `pip -c <constraints>` (the TPU image) could disagree with the pinned
    stack: the constraints file not copied in, an install without `-c`, a version written in the Dockerfile, a
    package the constraints do not pin, or a `name @ url` requirement other than one of `from_commits` (packages
    installed from their known-good commit, the backend's pinned sources). Empty when every version comes from
    the constraints or those commits."""
    copied = re.search(rf"^COPY requirements/{re.escape(constraints_name)} (\S+)$", dockerfile_text, re.MULTILINE)
    if not copied:
        return [f"the Dockerfile does not COPY requirements/{constraints_name}"]
    problems = []
    installs = pip_installs(dockerfile_text)
    if not installs:
        problems.append("the Dockerfile has no pip install")
    for args in installs:
        constraint = [args[i + 1] for i, a in enumerate(args[:-1]) if a in ("-c", "--constraint")]
        if constraint != [copied.group(1)]:
            problems.append(f"pip install {' '.join(args)}: not constrained by {copied.group(1)} (-c)")
        values = {args[i + 1] for i, a in enumerate(args[:-1]) if a in PIP_OPTIONS_WITH_VALUES}
        for word in args:
            if word.startswith("-") or word in values or word.startswith("/"):
                continue  # options, their values, and the slime wheel (its [tpu] extra is pinned by -c too)
            if " @ " in word:
                if word not in from_commits:
                    problems.append(
                        f"pip install {word}: not a known-good commit ({', '.join(from_commits) or 'none'})"
                    )
                continue
            name = re.split(r"[\[=<>~! ]", word, maxsplit=1)[0]
            if word != name and not re.fullmatch(r"[A-Za-z0-9._-]+\[[A-Za-z0-9,_-]+\]", word):
                problems.append(f"pip install {word}: the version belongs in {constraints_name}, not the Dockerfile")
            elif canonical(name) not in pins:
                problems.append(f"pip install {word}: {constraints_name} pins no {name}")
    return problems


def image_tags(
    repository: str, hardware: str, version: str, channel: str, date: datetime.date | None = None
) -> list[str]:
    """All tags one image is pushed under.

    release: <repo>:<version>-<hw> and <repo>:latest-<hw>
    nightly: <repo>:nightly-<hw> and <repo>:nightly-<hw>-YYYYMMDD (plus <repo>:<version>-<hw>, the exact dev version)
    """
    if hardware not in IMAGES:
        raise ValueError(f"unknown hardware {hardware!r}; images exist for {', '.join(IMAGES)}")
    if not repository or repository != repository.lower() or ":" in repository.rsplit("/", 1)[-1]:
        raise ValueError(f"image repository {repository!r} must be lower-case and carry no tag")
    if "+" in version:
        raise ValueError(f"version {version} has a local label; images are pushed only for release or nightly builds")
    if channel == "release":
        if not TAG_PATTERN.match(version) or version.startswith("v"):
            raise ValueError(f"release images need an X.Y.Z version, got {version!r}")
        return [f"{repository}:{version}-{hardware}", f"{repository}:latest-{hardware}"]
    if channel == "nightly":
        if date is None:
            raise ValueError("nightly image tags need the build date")
        if not version.endswith(f".dev{date:%Y%m%d}"):
            raise ValueError(f"nightly version {version} does not carry the build date {date:%Y%m%d}")
        return [
            f"{repository}:nightly-{hardware}",
            f"{repository}:nightly-{hardware}-{date:%Y%m%d}",
            f"{repository}:{version}-{hardware}",
        ]
    raise ValueError(f"unknown channel {channel!r}; images are tagged for release or nightly")


def smoke_command(hardware: str) -> list[str]:
    """What each image runs as its smoke test: the environment report for the image's own backend."""
    return ["slime", "env", "--json", "--hardware", hardware]


def check_smoke_output(hardware: str, output: str, version: str | None = None) -> list[str]:
    """Problems in the JSON printed by `smoke_command(hardware)` inside an image; empty when it passes."""
    try:
        report = json.loads(output)
    except json.JSONDecodeError as exc:
        return [f"smoke output is not JSON ({exc.msg} at line {exc.lineno}): {output[:200]!r}"]
    problems = []
    if report.get("selected") != hardware:
        problems.append(
            f"backend {hardware} not usable in the image: {report.get('selection_error') or report.get('selected')}"
        )
    backend = next((b for b in report.get("backends", []) if b.get("name") == hardware), None)
    if backend is None or not backend.get("available"):
        problems.append(f"backend {hardware} reported unavailable: {backend and backend.get('reason')}")
    if version is not None and report.get("slime") != version:
        problems.append(f"image carries slime {report.get('slime')}, expected {version}")
    for entry in report.get("pinned_sources", []):  # packages the image builds from their known-good commit
        if entry.get("backend") == hardware and not entry.get("known_good"):
            problems.append(f"image carries {entry.get('package')} {entry.get('version')}: {entry.get('summary')}")
    return problems


def build_command(hardware: str, wheel_name: str, tags: list[str]) -> list[str]:
    """`docker build` for one image, run from the repository root with the wheel in dist/."""
    spec = IMAGES[hardware]
    command = ["docker", "build", "--file", spec.dockerfile, "--build-arg", f"SLIME_WHEEL={wheel_name}"]
    for arg, value in build_args(hardware).items():
        command += ["--build-arg", f"{arg}={value}"]
    for tag in tags:
        command += ["--tag", tag]
    return [*command, "."]


def smoke_run_command(hardware: str, image: str) -> list[str]:
    """`docker run` of the smoke command with the device exposed to the container."""
    return ["docker", "run", "--rm", *IMAGES[hardware].run_flags, image, *smoke_command(hardware)]
