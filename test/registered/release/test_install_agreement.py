"""One pinned stack per hardware: pyproject's extras, requirements/constraints-<hw>.txt, the Dockerfiles' build
args, release/images.py, the backends' install hints and image names, and the README must all say the same."""

import re
import tomllib
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from release.images import IMAGES, build_args, build_command, image_tags
from release.pins import hardware_pins, read_pins
from release.resolve import STACKS
from slime import DISTRIBUTION
from slime.backends import get_backend_class
from slime.backends.base import EXTRA_MIN_PYTHON, install_command
from slime.backends.tpu import SGLANG_JAX
from slime.env_report import extras_status
from slime.testing.ci_register import register_cpu_ci

register_cpu_ci(est_time=3, suite="base-a-test-cpu")

REPO = Path(__file__).resolve().parents[3]
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
HARDWARE = ("cpu", "cuda", "rocm", "tpu")


def extra_requirements(extra: str, python: str) -> dict[str, Requirement]:
    """The extra's requirements that apply on `python` (markers evaluated there), by canonical name."""
    env = dict(default_environment(), python_version=python, python_full_version=f"{python}.0", extra=extra)
    found = {}
    for line in PROJECT["optional-dependencies"][extra]:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate(env):
            continue
        if canonicalize_name(req.name) == canonicalize_name(DISTRIBUTION):  # an extra made of our own extras
            for inner in req.extras:
                found.update(extra_requirements(inner, python))
        else:
            found[canonicalize_name(req.name)] = req
    return found


def dockerfile_args(hardware: str) -> dict[str, str]:
    text = (REPO / IMAGES[hardware].dockerfile).read_text()
    return dict(re.findall(r"^ARG (\w+)=(\S+)$", text, re.MULTILINE))


def test_the_distribution_name_is_ours_and_used_everywhere():
    assert PROJECT["name"] == DISTRIBUTION and DISTRIBUTION != "slime"
    assert PROJECT["scripts"] == {"slime": "slime.cli:main"}  # the command stays `slime`
    readme = (REPO / "README.md").read_text()
    installs = re.findall(r"pip install [^\n]*\[(?:cpu|cuda|rocm|tpu)\]", readme)
    assert installs and all(DISTRIBUTION in line for line in installs), installs
    assert f"pip install '{DISTRIBUTION}[cuda]'" in install_command("cuda", (3, 12))


@pytest.mark.parametrize("hardware", HARDWARE)
def test_extras_admit_exactly_the_pinned_stack(hardware):
    pins = hardware_pins(hardware)
    for python in STACKS[hardware].pythons:
        for name, req in extra_requirements(hardware, python).items():
            if name not in pins:
                continue
            assert req.specifier.contains(pins[name], prereleases=True), (
                f"[{hardware}] on {python}: {req} does not admit constraints-{hardware}.txt's {name}=={pins[name]}"
            )
            exact = [s.version for s in req.specifier if s.operator == "=="]
            assert exact in ([], [pins[name]]), f"[{hardware}] pins {name}=={exact[0]}, constraints {pins[name]}"


def test_the_cuda_stack_pins_sglang_on_one_line_the_contract_test_reads():
    text = (REPO / "requirements" / "constraints-cuda.txt").read_text()
    assert len(re.findall(r"^sglang==[0-9][^\s]*$", text, re.MULTILINE)) == 1
    assert hardware_pins("rocm")["sglang"] == hardware_pins("cuda")["sglang"]  # one SGLang for both GPU images


@pytest.mark.parametrize("hardware", HARDWARE)
def test_dockerfile_defaults_and_image_build_args_follow_the_constraints(hardware):
    declared = dockerfile_args(hardware)
    for arg, value in build_args(hardware).items():
        assert declared.get(arg) == value, (
            f"{IMAGES[hardware].dockerfile}: ARG {arg}={declared.get(arg)}, pins say {value}"
        )
    command = build_command(hardware, f"{DISTRIBUTION.replace('-', '_')}-1.0.0-py3-none-any.whl", ["t"])
    assert all(f"{arg}={value}" in command for arg, value in build_args(hardware).items())


def test_image_python_matches_the_extra_python():
    assert dockerfile_args("cpu")["PYTHON_VERSION"] in STACKS["cpu"].pythons
    assert dockerfile_args("tpu")["PYTHON_VERSION"] in STACKS["tpu"].pythons


def test_backends_name_the_published_image_and_the_new_distribution():
    for hardware in HARDWARE:
        backend = get_backend_class(hardware)
        assert backend.docker_image in image_tags("ghcr.io/slime-rl/slime", hardware, "1.0.0", "release")
        assert backend().install_hint().startswith(f"pip install '{DISTRIBUTION}[{backend.extra}]'")


@pytest.mark.parametrize("extra", ["cpu", "cuda", "rocm", "tpu"])
def test_python_floor_in_markers_matches_the_backend_hint(extra):
    left_out_on_311 = set(extra_requirements(extra, "3.12")) - set(extra_requirements(extra, "3.11"))
    floor = EXTRA_MIN_PYTHON.get(extra)
    assert bool(left_out_on_311) == (floor == (3, 12)), (extra, left_out_on_311)
    assert set(STACKS[extra].pythons) == ({"3.12"} if floor else {"3.11", "3.12"})
    if floor:
        assert "on Python >= 3.12 (this is 3.11)" in install_command(extra, (3, 11))
        assert install_command(extra, (3, 12)) == f"pip install '{DISTRIBUTION}[{extra}]'"


class InstalledDists:
    def __init__(self, versions):
        self.versions = versions

    def dist_version(self, name):
        return self.versions.get(name)


def test_env_report_says_when_this_python_is_too_old_for_an_extra():
    requires = [
        "sglang==0.5.10.post1; python_version >= '3.12' and extra == 'cuda'",
        "megatron-core==0.16.1; extra == 'cuda'",
        "torch>=2.6; extra == 'cpu'",
        # one name pinned differently per Python is not "left out"
        "megatron-core==0.16.1; python_version < '3.12' and extra == 'cpu'",
        "megatron-core>=0.16.1; python_version >= '3.12' and extra == 'cpu'",
    ]
    env = dict(default_environment(), python_version="3.11")
    status = extras_status(InstalledDists({"megatron-core": "0.16.1", "torch": "2.13.0"}), requires, env)
    assert status["cpu"] == {"satisfied": True, "problems": []}
    assert status["cuda"]["satisfied"] is False
    assert status["cuda"]["problems"] == ["Python 3.11 is too old for this stack (sglang left out)"]
    newer = extras_status(InstalledDists({}), requires, dict(env, python_version="3.12"))
    assert newer["cuda"]["problems"] == ["sglang not installed", "megatron-core not installed"]


def test_constraints_lines_are_exact_pins(tmp_path):
    bad = tmp_path / "constraints-x.txt"
    bad.write_text("# ok\nsglang>=0.5\n")
    with pytest.raises(ValueError, match=r"constraints-x.txt:2: a constraints line pins one exact version"):
        read_pins(bad)


def tpu_dockerfile() -> str:
    return (REPO / IMAGES["tpu"].dockerfile).read_text()


TPU_FROM_COMMITS = (SGLANG_JAX.archive_requirement,)


def test_the_tpu_image_takes_every_version_from_the_constraints_the_extra_follows():
    from release.images import dockerfile_pin_problems, pip_installs

    problems = dockerfile_pin_problems(tpu_dockerfile(), hardware_pins("tpu"), "constraints-tpu.txt", TPU_FROM_COMMITS)
    assert problems == []
    assert not re.findall(r"^ARG \w+_VERSION=", tpu_dockerfile().replace("ARG PYTHON_VERSION=", ""), re.MULTILINE)
    # what the image installs by name is what the [tpu] extra brings (the extra's own pins are checked above)
    words = [word for args in pip_installs(tpu_dockerfile()) for word in args]
    named = {
        canonicalize_name(re.split(r"[\[=]", word)[0])
        for word in words
        if not word.startswith(("-", "/", "http")) and " @ " not in word
    }
    assert named <= set(extra_requirements("tpu", "3.12")), named - set(extra_requirements("tpu", "3.12"))
    # and sglang-jax from its known-good commit, after slime (so the extra's pins are in place first)
    assert words[-1] == SGLANG_JAX.archive_requirement, words[-1]


def test_the_readme_adds_sglang_jax_at_the_known_good_commit_with_one_command():
    readme = (REPO / "README.md").read_text()
    assert SGLANG_JAX.install_command in readme
    # no other sglang-jax commit or release is offered as the way to install it
    offered = re.findall(r"sglang-jax==[^\s`'\"]+|git\+https://github\.com/sgl-project/sglang-jax[^\s`'\"]*", readme)
    assert set(offered) == {SGLANG_JAX.git_requirement.split(" @ ", 1)[1]}, offered
    assert "sglang-jax" not in hardware_pins("tpu")  # never from the index while no release of it works


REQUIRES_AT_COMMIT = REPO / "test/registered/release/fixtures/sglang-jax" / f"requires-{SGLANG_JAX.commit}.txt"


@pytest.mark.parametrize("constraints, jax_extra", [("tpu", "tpu"), ("tpu-cpu", "cpu")])
def test_the_tpu_constraints_satisfy_sglang_jax_at_its_known_good_commit(constraints, jax_extra):
    """The commit's own Requires-Dist (recorded from its wheel; re-record when the commit moves): every package it
    constrains that our stack pins must be pinned inside its range, so adding it to the stack moves nothing."""
    assert REQUIRES_AT_COMMIT.exists(), f"record {REQUIRES_AT_COMMIT.name} for the new commit"
    pins = hardware_pins(constraints)
    env = dict(default_environment(), python_version="3.12", python_full_version="3.12.0", extra=jax_extra)
    checked = set()
    for line in REQUIRES_AT_COMMIT.read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        req = Requirement(line)
        name = canonicalize_name(req.name)
        if (req.marker is None or req.marker.evaluate(env)) and name in pins:
            assert req.specifier.contains(pins[name]), f"sglang-jax@{SGLANG_JAX.short_commit}: {req}, pin {pins[name]}"
            checked.add(name)
    assert {"jax", "flax", "transformers", "numpy"} <= checked, checked


def test_the_tpu_on_cpu_constraints_are_the_tpu_stack_without_libtpu():
    tpu, tpu_on_cpu = hardware_pins("tpu"), hardware_pins("tpu-cpu")
    assert tpu_on_cpu == {name: version for name, version in tpu.items() if name != "libtpu"}


@pytest.mark.parametrize(
    "edit, problem",
    [
        (('"jax[tpu]" flax', '"jax[tpu]==0.8.2" flax'), "jax[tpu]==0.8.2: the version belongs in constraints-tpu.txt"),
        (('-c /tmp/constraints-tpu.txt "jax[tpu]"', '"jax[tpu]"'), "not constrained by /tmp/constraints-tpu.txt"),
        (
            ('"jax[tpu]" flax', '"jax[tpu]" flax ml-dtypes'),
            "pip install ml-dtypes: constraints-tpu.txt pins no ml-dtypes",
        ),
        ((SGLANG_JAX.commit, "0123456789abcdef0123456789abcdef01234567"), "not a known-good commit"),
        (("COPY requirements/constraints-tpu.txt", "COPY requirements/constraints-cpu.txt"), "does not COPY"),
    ],
)
def test_a_tpu_dockerfile_that_disagrees_with_the_constraints_is_caught(edit, problem):
    from release.images import dockerfile_pin_problems

    old, new = edit
    assert old in tpu_dockerfile()
    edited = tpu_dockerfile().replace(old, new)
    problems = dockerfile_pin_problems(edited, hardware_pins("tpu"), "constraints-tpu.txt", TPU_FROM_COMMITS)
    assert any(problem in p for p in problems), problems
