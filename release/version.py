"""The version a build gets, decided by one function from the state of the git checkout.

Rules (each is unit-tested in test/registered/release/test_version_images_gating.py):
  channel "release": HEAD must carry a tag vX.Y.Z (or X.Y.Z) and the tree must be clean -> "X.Y.Z".
  channel "nightly": clean tree; the next patch after the newest tag reachable from HEAD, plus
                     ".devYYYYMMDD" -> "X.Y.(Z+1).devYYYYMMDD". Dev releases sort below the release they lead
                     to and above the previous one, and pip only picks them with --pre.
                     With no tag at all the next version is the one declared in slime/__init__.py.
  channel "dev" (local builds): a tagged clean HEAD gives "X.Y.Z"; otherwise the nightly base with
                     ".dev<commits since tag>+g<sha7>" and ".dirty" for uncommitted changes. The "+" local label
                     marks the build as unpublishable: PyPI rejects local versions and `release publish` refuses them.
"""

from __future__ import annotations

import datetime
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

TAG_PATTERN = re.compile(r"^v?(\d+)\.(\d+)\.(\d+)$")
CHANNELS = ("release", "nightly", "dev")


class VersionError(ValueError):
    """A one-line reason why this checkout cannot produce the requested kind of version."""


@dataclass(frozen=True)
class GitState:
    last_tag: str | None  # newest X.Y.Z tag reachable from HEAD (as written, e.g. "v0.2.0"), None if none
    commits_since_tag: int  # 0 when HEAD is the tagged commit; commits since the root when there is no tag
    commit: str  # full sha of HEAD
    dirty: bool  # tracked files differ from HEAD (untracked files never enter a build)


def parse_tag(tag: str) -> tuple[int, int, int]:
    match = TAG_PATTERN.match(tag)
    if not match:
        raise VersionError(f"tag {tag!r} is not a release tag; release tags look like v1.2.3")
    return int(match.group(1)), int(match.group(2)), int(match.group(3))


def _next_version(state: GitState, declared: str) -> str:
    if state.last_tag is None:
        parse_tag(declared)
        return declared
    major, minor, patch = parse_tag(state.last_tag)
    return f"{major}.{minor}.{patch + 1}"


def compute_version(state: GitState, channel: str, declared: str, date: datetime.date | None = None) -> str:
    """The PEP 440 version for a build of `state` on `channel`. `declared` is slime.__version__ in the tree."""
    if channel not in CHANNELS:
        raise VersionError(f"unknown channel {channel!r}; choose one of {', '.join(CHANNELS)}")
    tagged_head = state.last_tag is not None and state.commits_since_tag == 0
    if channel == "release":
        if state.last_tag is None:
            raise VersionError("no release tag reachable from HEAD; tag the commit (git tag v1.2.3) to release it")
        if not tagged_head:
            raise VersionError(
                f"HEAD is {state.commits_since_tag} commit(s) past {state.last_tag}; tag HEAD to release it"
            )
        if state.dirty:
            raise VersionError("the working tree has uncommitted changes; a release is built from a clean tag")
        return "{}.{}.{}".format(*parse_tag(state.last_tag))
    if channel == "nightly":
        if date is None:
            raise VersionError("a nightly version needs the build date")
        if state.dirty:
            raise VersionError("the working tree has uncommitted changes; a nightly is built from a clean commit")
        return f"{_next_version(state, declared)}.dev{date:%Y%m%d}"
    if tagged_head and not state.dirty:
        return "{}.{}.{}".format(*parse_tag(state.last_tag))
    local = f"g{state.commit[:7]}" + (".dirty" if state.dirty else "")
    return f"{_next_version(state, declared)}.dev{state.commits_since_tag}+{local}"


POLICY_VERSION = re.compile(r"^(\d+)\.(\d+)\.(\d+)(?:\.dev(\d{8}))?$")


def is_policy_version(version: str) -> bool:
    """Whether `compute_version` could have produced `version` for the release or nightly channel: X.Y.Z, or
    X.Y.Z.devYYYYMMDD with a real date. Anything else on our index page (1.0, 2.0.0rc1, 0.3.post1, a local
    label) was not uploaded by our workflows."""
    match = POLICY_VERSION.match(version)
    if not match or any(len(part) > 1 and part.startswith("0") for part in match.groups()[:3]):
        return False
    if match.group(4) is None:
        return True
    try:
        datetime.datetime.strptime(match.group(4), "%Y%m%d")
    except ValueError:
        return False
    return True


def is_publishable(version: str) -> bool:
    """Only versions without a local label can go to a package index."""
    return "+" not in version


def _git(repo: Path, *args: str) -> str:
    result = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise VersionError(f"git {' '.join(args)} failed in {repo}: {result.stderr.strip() or result.stdout.strip()}")
    return result.stdout.strip()


def read_git_state(repo: Path) -> GitState:
    commit = _git(repo, "rev-parse", "HEAD")
    tags = [t for t in _git(repo, "tag", "--merged", "HEAD").splitlines() if TAG_PATTERN.match(t)]
    last_tag = max(tags, key=parse_tag) if tags else None
    if last_tag is None:
        distance = int(_git(repo, "rev-list", "--count", "HEAD"))
    else:
        distance = int(_git(repo, "rev-list", "--count", f"{last_tag}..HEAD"))
    dirty = bool(_git(repo, "status", "--porcelain", "--untracked-files=no"))
    return GitState(last_tag, distance, commit, dirty)


VERSION_LINE = re.compile(r'^__version__ = "([^"]+)"$', re.MULTILINE)


def declared_version(repo: Path) -> str:
    """slime.__version__ as written in slime/__init__.py (read as text: the build must not import slime)."""
    init = repo / "slime" / "__init__.py"
    found = VERSION_LINE.findall(init.read_text(encoding="utf-8"))
    if len(found) != 1:
        raise VersionError(f'{init}: expected exactly one line `__version__ = "X.Y.Z"`, found {len(found)}')
    return found[0]


def stamp_version(init_file: Path, version: str) -> None:
    """Rewrite the __version__ line of a staged copy of slime/__init__.py."""
    text = init_file.read_text(encoding="utf-8")
    new, count = VERSION_LINE.subn(f'__version__ = "{version}"', text)
    if count != 1:
        raise VersionError(f'{init_file}: expected exactly one line `__version__ = "X.Y.Z"`, found {count}')
    init_file.write_text(new, encoding="utf-8")
