"""Publish built distributions to a package index with twine, credentials from the environment.

A version that is already on the index is refused (checked on the index's simple page before any upload, and
again by the index itself) unless the caller asks to skip existing files, which is how a re-run nightly behaves.
An index page for our name that lists files our version policy could not have produced (release/version.py:
is_policy_version) belongs to someone else: publishing there is refused, so a wrong name or index cannot push
into another project. A first upload (no page yet) is allowed.
"""

from __future__ import annotations

import html.parser
import os
import re
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path

from release.version import is_policy_version, is_publishable
from slime import DISTRIBUTION

CREDENTIAL_VARS = ("TWINE_USERNAME", "TWINE_PASSWORD")


class PublishError(RuntimeError):
    """One-line reason the upload did not happen."""


class _Links(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            href = dict(attrs).get("href") or ""
            self.names.append(href.split("#")[0].rsplit("/", 1)[-1])


def files_on_index(simple_url: str, project: str = DISTRIBUTION, timeout: float = 30.0) -> list[str]:
    """File names the index lists for `project` (PEP 503 simple page); [] when the project is unknown."""
    url = simple_url.rstrip("/") + f"/{project}/"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            page = response.read().decode()
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return []
        raise PublishError(f"cannot read {url}: HTTP {exc.code}") from None
    except urllib.error.URLError as exc:
        raise PublishError(f"cannot read {url}: {exc.reason}") from None
    parser = _Links()
    parser.feed(page)
    return parser.names


# Our file names: the normalized name (slime_rl) as setuptools writes it, or the dashed form of older tools.
OUR_FILE = re.compile("^" + DISTRIBUTION.replace("-", "[-_]") + r"-([^-]+?)(?:\.tar\.gz|-.+\.whl)$")


def version_of(dist: Path) -> str:
    match = OUR_FILE.match(dist.name)
    if not match:
        raise PublishError(f"{dist.name} is not a {DISTRIBUTION} wheel or sdist")
    return match.group(1)


def foreign_files(listed: list[str]) -> list[str]:
    """Files on our index page that our workflows could not have uploaded: another project's names, or versions
    outside our version policy."""
    foreign = []
    for name in listed:
        match = OUR_FILE.match(name)
        if match is None or not is_policy_version(match.group(1)):
            foreign.append(name)
    return foreign


def check_ownership(listed: list[str], simple_url: str) -> None:
    """Refuse an index whose page for our name carries files that are not ours."""
    foreign = foreign_files(listed)
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise PublishError(
            f"{simple_url.rstrip('/')}/{DISTRIBUTION}/ lists files our version policy could not have produced "
            f"({shown}): the name belongs to another project there; refusing to publish"
        )


def existing_files(dists: list[Path], listed: list[str]) -> list[str]:
    """The dists whose version is already on the index (any file of that version counts)."""
    versions_listed = set()
    for name in listed:
        try:
            versions_listed.add(version_of(Path(name)))
        except PublishError:
            continue
    return [d.name for d in dists if version_of(d) in versions_listed]


def publish(
    dists: list[Path],
    repository_url: str,
    simple_url: str | None,
    skip_existing: bool,
    environ: Mapping[str, str] = os.environ,
    python: str = sys.executable,
) -> str:
    """Upload `dists`; returns a one-line summary. Raises PublishError with a one-line reason."""
    if not dists:
        raise PublishError("nothing to publish: no wheel or sdist given")
    for dist in dists:
        if not dist.is_file():
            raise PublishError(f"{dist}: no such file")
        if not is_publishable(version_of(dist)):
            raise PublishError(
                f"{dist.name}: local version (with '+') cannot be published; build with --channel release or nightly"
            )
    missing = [v for v in CREDENTIAL_VARS if not environ.get(v)]
    if missing:
        raise PublishError(f"credentials missing: set {' and '.join(missing)} in the environment")
    if simple_url:
        listed = files_on_index(simple_url)
        check_ownership(listed, simple_url)
        present = existing_files(dists, listed)
        if present and not skip_existing:
            raise PublishError(
                f"version {version_of(dists[0])} already exists on {simple_url} ({', '.join(present)}); "
                "pass --skip-existing to skip it"
            )
        if present and len(present) == len(dists):
            return f"skipped: {', '.join(present)} already on the index"
    command = [
        python,
        "-m",
        "twine",
        "upload",
        "--non-interactive",
        "--disable-progress-bar",
        "--repository-url",
        repository_url,
    ]
    if skip_existing:
        command.append("--skip-existing")
    env = {k: v for k, v in environ.items() if k != "TWINE_REPOSITORY_URL"}
    result = subprocess.run([*command, *map(str, dists)], capture_output=True, text=True, env=env)
    if result.returncode != 0:
        lines = [line.strip() for line in (result.stdout + result.stderr).splitlines() if line.strip()]
        reason = next(
            (line for line in lines if "HTTPError" in line or "Forbidden" in line or "ERROR" in line),
            lines[-1] if lines else "",
        )
        raise PublishError(f"upload to {repository_url} refused: {reason}")
    return f"uploaded {', '.join(d.name for d in dists)} to {repository_url}"
