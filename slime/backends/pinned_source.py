"""Packages a backend runs from one commit of their repository, because no release on the index works.

The commit is written once, in the backend that needs the package (`Backend.pinned_sources`); the README's
install command, the Docker image and the constraints are checked against it
(test/registered/release/test_install_agreement.py). `slime env` says whether the installed copy is that commit,
reading only the distribution's metadata: its version's local label (`+g<commit>`, how a wheel built at a commit
is named) or the `direct_url.json` pip writes for a git or archive install. Importing the package can be slow
(JAX starts), so it is never imported here.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from packaging.version import InvalidVersion, Version

MIN_COMMIT_PREFIX = 7  # what git itself accepts as an abbreviated commit; shorter is too ambiguous to trust
HEX = re.compile(r"[0-9a-f]+")


@dataclass(frozen=True)
class PinnedSource:
    dist: str  # the distribution name pip installs it under
    repository: str  # https://github.com/<owner>/<name>
    commit: str  # the full 40-hex commit known to work
    subdirectory: str = ""  # where its pyproject.toml lives inside the repository

    @property
    def short_commit(self) -> str:
        return self.commit[:12]

    def _fragment(self) -> str:
        return f"#subdirectory={self.subdirectory}" if self.subdirectory else ""

    @property
    def git_requirement(self) -> str:
        """The requirement users install (README): pip clones the repository at the commit."""
        return f"{self.dist} @ git+{self.repository}@{self.commit}{self._fragment()}"

    @property
    def archive_requirement(self) -> str:
        """The same commit as a source archive: what an image installs without git in it."""
        return f"{self.dist} @ {self.repository}/archive/{self.commit}.tar.gz{self._fragment()}"

    @property
    def install_command(self) -> str:
        return f'pip install "{self.git_requirement}"'


@dataclass(frozen=True)
class SourceVerdict:
    dist: str
    version: str | None  # None: not installed
    known_good: bool
    summary: str  # one line for `slime env`


def installed_commit(version: str | None, direct_url: str | None) -> tuple[str | None, str]:
    """(the commit, or a prefix of it, the installed copy was built from; where that was read). None when neither
    the install record nor the version names a commit (an index release, a local folder)."""
    record = _json_object(direct_url)
    vcs_commit = (record.get("vcs_info") or {}).get("commit_id")
    if isinstance(vcs_commit, str) and HEX.fullmatch(vcs_commit.lower()):
        return vcs_commit.lower(), "git install"
    if "archive_info" in record:
        named = re.search(r"/archive/([0-9a-fA-F]{7,40})\.(?:tar\.gz|zip)", str(record.get("url", "")))
        if named:
            return named.group(1).lower(), "archive install"
    try:
        local = Version(version).local if version else None
    except InvalidVersion:
        local = None
    label = re.fullmatch(r"g([0-9a-f]{7,40})", (local or "").split(".")[0])
    if label:
        return label.group(1), "version label"
    return None, "local folder" if "dir_info" in record else "index release"


def _json_object(text: str | None) -> dict:
    try:
        parsed = json.loads(text) if text else {}
    except ValueError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


def pinned_source_verdict(source: PinnedSource, version: str | None, direct_url: str | None) -> SourceVerdict:
    """Whether the installed `source.dist` is the known-good commit, from its version and pip's direct_url.json."""
    if version is None:
        return SourceVerdict(source.dist, None, False, f"not installed (known-good: commit {source.short_commit})")
    commit, origin = installed_commit(version, direct_url)
    if commit is not None and len(commit) >= MIN_COMMIT_PREFIX and source.commit.startswith(commit):
        return SourceVerdict(source.dist, version, True, f"the known-good commit {source.short_commit} ({origin})")
    built_from = f"commit {commit[:12]}" if commit else {"index release": "an index release"}.get(origin, f"a {origin}")
    summary = f"{built_from}, not the known-good commit {source.short_commit}: {source.install_command}"
    return SourceVerdict(source.dist, version, False, summary)


def installed_verdict(source: PinnedSource) -> SourceVerdict:
    """The verdict for this environment's copy of `source.dist` (metadata only, nothing imported)."""
    from importlib import metadata

    try:
        dist = metadata.distribution(source.dist)
    except metadata.PackageNotFoundError:
        return pinned_source_verdict(source, None, None)
    return pinned_source_verdict(source, dist.version, dist.read_text("direct_url.json"))


def main(argv: list[str] | None = None) -> int:
    """`python -m slime.backends.pinned_source --check DIST | --requirement DIST`, for the install scripts: whether
    this environment has the known-good commit of DIST (exit 0, else 1 with the verdict), or DIST's git
    requirement at that commit."""
    import argparse
    import sys

    from slime.backends.base import backend_names, get_backend_class

    parser = argparse.ArgumentParser(prog="python -m slime.backends.pinned_source")
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--check", metavar="DIST")
    action.add_argument("--requirement", metavar="DIST")
    args = parser.parse_args(argv)
    wanted = args.check or args.requirement
    sources = {s.dist: s for name in backend_names() for s in get_backend_class(name).pinned_sources}
    if wanted not in sources:
        print(f"no backend pins a commit of {wanted} (pinned: {', '.join(sorted(sources)) or 'none'})", file=sys.stderr)
        return 2
    if args.requirement:
        print(sources[wanted].git_requirement)
        return 0
    verdict = installed_verdict(sources[wanted])
    print(f"{wanted}: {verdict.version or '-'}: {verdict.summary}")
    return 0 if verdict.known_good else 1


if __name__ == "__main__":
    raise SystemExit(main())
