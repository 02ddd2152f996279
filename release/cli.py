"""python -m release <command>: versions, build/check/publish, image tags and builds, workflow generation, CI steps.

Every user mistake ends in one line on stderr and exit status 2; a failed check exits 1.
"""

from __future__ import annotations

import argparse
import datetime
import subprocess
import sys
from pathlib import Path

from release.perf import ALL_HARDWARE

REPO = Path(__file__).resolve().parent.parent


def _date(text: str) -> datetime.date:
    try:
        return datetime.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--date must be YYYY-MM-DD, got {text!r}") from None


def _write_outputs(path: Path | None, values: dict[str, str]) -> None:
    if path is None:
        return
    with path.open("a", encoding="utf-8") as handle:
        for key, value in values.items():
            handle.write(f"{key}={value}\n")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m release", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    v = sub.add_parser("version", help="print the version this checkout builds as")
    v.add_argument("--channel", choices=("release", "nightly", "dev"), default="dev")
    v.add_argument("--date", type=_date, help="build date for nightly (default: today, UTC)")

    b = sub.add_parser("build", help="build sdist + wheel from the tracked files, stamped with the version")
    b.add_argument("--channel", choices=("release", "nightly", "dev"), default="dev")
    b.add_argument("--date", type=_date)
    b.add_argument("--outdir", type=Path, default=REPO / "dist")
    b.add_argument("--github-output", type=Path, help="append version= and date= lines here")

    c = sub.add_parser("check", help="twine check --strict and inspect wheel/sdist contents")
    c.add_argument("dists", nargs="+", type=Path)

    pub = sub.add_parser("publish", help="upload with twine; credentials from TWINE_USERNAME / TWINE_PASSWORD")
    pub.add_argument("dists", nargs="+", type=Path)
    pub.add_argument("--repository-url", required=True, help="upload endpoint, e.g. https://upload.pypi.org/legacy/")
    pub.add_argument("--simple-url", help="the index's simple page, checked for the version before uploading")
    pub.add_argument("--skip-existing", action="store_true", help="skip files whose version is already there")

    e = sub.add_parser(
        "exists", help="whether the dists' version is already on an index (refuses unless --skip-existing)"
    )
    e.add_argument("dists", nargs="+", type=Path)
    e.add_argument("--simple-url", required=True)
    e.add_argument("--skip-existing", action="store_true")
    e.add_argument("--github-output", type=Path)

    t = sub.add_parser("image-tags", help="the tags an image is pushed under")
    for q in (t, sub.add_parser("image", help="docker build, smoke-test, and (with --push) push one image")):
        q.add_argument("--hardware", required=True)
        q.add_argument("--channel", choices=("release", "nightly"), required=True)
        q.add_argument("--version", required=True)
        q.add_argument("--date", type=_date)
        q.add_argument("--repository", default=None)
    image = sub.choices["image"]
    image.add_argument("--push", action="store_true")
    image.add_argument("--dry-run", action="store_true", help="print the docker commands, run nothing")
    image.add_argument("--dist", type=Path, default=REPO / "dist")

    s = sub.add_parser("smoke-check", help="check the JSON of `slime env --json --hardware HW`")
    s.add_argument("--hardware", required=True)
    s.add_argument("--version")
    s.add_argument("report", type=Path)

    w = sub.add_parser("workflows", help="write .github/ from the test registry (--check: fail on drift)")
    w.add_argument("--check", action="store_true")

    sub.add_parser("lint", help="workflow drift, actionlint, zizmor --offline, hadolint")

    perf = sub.add_parser(
        "perf", help="nightly performance: run the benchmarks, gate them, report (see release/perf_gate.py)"
    )
    perf.add_argument("--hardware", required=True, choices=ALL_HARDWARE)
    perf.add_argument("--out", type=Path, required=True, help="folder for the benchmark JSON, records, report")
    perf.add_argument("--history", type=Path, help="JSONL of earlier nights' records (tonight's are appended)")
    perf.add_argument("--only", nargs="+", help="run only these benchmarks")
    perf.add_argument("--records", type=Path, help="gate and report these records instead of running the benchmarks")
    perf.add_argument("--timeout", type=float, default=1800.0, help="seconds per benchmark")

    ci = sub.add_parser("ci", help="a workflow step: changes, gate, health, wait, finish")
    ci.add_argument("step", choices=("changes", "gate", "health", "wait", "finish"))
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return _dispatch(args)
    except Exception as exc:  # the release errors below carry one-line, user-facing messages
        from release.build import BuildError
        from release.lint import ToolMissing
        from release.publish import PublishError
        from release.version import VersionError

        if isinstance(exc, (BuildError, PublishError, VersionError, ToolMissing, ValueError)):
            print(f"error: {exc}", file=sys.stderr)
            return 2
        raise


def _version(channel: str, date: datetime.date | None) -> str:
    from release.version import compute_version, declared_version, read_git_state

    date = date or datetime.datetime.now(datetime.UTC).date()
    return compute_version(read_git_state(REPO), channel, declared_version(REPO), date)


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "version":
        print(_version(args.channel, args.date))
        return 0
    if args.command == "build":
        from release.build import build

        date = args.date or datetime.datetime.now(datetime.UTC).date()
        version = _version(args.channel, date)
        dists = build(REPO, version, args.outdir)
        print(f"built {dists.sdist.name} and {dists.wheel.name} in {args.outdir}")
        _write_outputs(args.github_output, {"version": version, "date": date.isoformat()})
        return 0
    if args.command == "check":
        from release.build import inspect_sdist, inspect_wheel, twine_check
        from release.publish import version_of

        twine_check(args.dists)
        problems = []
        for dist in args.dists:
            if dist.suffix == ".whl":
                problems += inspect_wheel(dist, version_of(dist))
            elif dist.name.endswith(".tar.gz"):
                problems += inspect_sdist(dist)
        for problem in problems:
            print(f"error: {problem}", file=sys.stderr)
        if not problems:
            print(f"ok: {', '.join(d.name for d in args.dists)}")
        return 1 if problems else 0
    if args.command == "publish":
        from release.publish import publish

        print(publish(args.dists, args.repository_url, args.simple_url, args.skip_existing))
        return 0
    if args.command == "exists":
        from release.publish import existing_files, files_on_index, version_of

        present = existing_files(args.dists, files_on_index(args.simple_url))
        _write_outputs(args.github_output, {"exists": "true" if present else "false"})
        if present and not args.skip_existing:
            print(f"error: version {version_of(args.dists[0])} already exists on {args.simple_url}", file=sys.stderr)
            return 1
        print(f"{'already there, skipping' if present else 'not there yet'}: {', '.join(d.name for d in args.dists)}")
        return 0
    if args.command in ("image-tags", "image"):
        return _image(args)
    if args.command == "smoke-check":
        from release.images import check_smoke_output

        problems = check_smoke_output(args.hardware, args.report.read_text(), args.version)
        for problem in problems:
            print(f"error: {problem}", file=sys.stderr)
        if not problems:
            print(f"smoke ok: backend {args.hardware} usable")
        return 1 if problems else 0
    if args.command == "workflows":
        from release.workflows import drift, write

        if args.check:
            stale = drift(REPO)
            if stale:
                print(
                    f"error: {', '.join(stale)} differ from the generator; run `python -m release workflows`",
                    file=sys.stderr,
                )
                return 1
            print("workflows match the registry")
            return 0
        written = write(REPO)
        print("wrote " + ", ".join(written) if written else "workflows already up to date")
        return 0
    if args.command == "lint":
        return _lint()
    if args.command == "perf":
        from release.nightly import perf_command

        return perf_command(REPO, args.hardware, args.out, args.history, args.only, args.records, args.timeout)
    if args.command == "ci":
        from release.ci import main as ci_main

        return ci_main(args.step)
    return 2


def _image(args: argparse.Namespace) -> int:
    from release.images import DEFAULT_REPOSITORY, build_command, check_smoke_output, image_tags, smoke_run_command

    tags = image_tags(args.repository or DEFAULT_REPOSITORY, args.hardware, args.version, args.channel, args.date)
    if args.command == "image-tags":
        print("\n".join(tags))
        return 0
    wheels = sorted(args.dist.glob(f"slime-{args.version}-*.whl"))
    if len(wheels) != 1:
        raise ValueError(f"expected one wheel for {args.version} in {args.dist}, found {[w.name for w in wheels]}")
    build_cmd, smoke_cmd = build_command(args.hardware, wheels[0].name, tags), smoke_run_command(args.hardware, tags[0])
    push_cmds = [["docker", "push", tag] for tag in tags] if args.push else []
    if args.dry_run:
        for command in (build_cmd, smoke_cmd, *push_cmds):
            print(" ".join(command))
        return 0
    subprocess.run(build_cmd, cwd=REPO, check=True)
    smoke = subprocess.run(smoke_cmd, capture_output=True, text=True)
    problems = check_smoke_output(args.hardware, smoke.stdout, args.version)
    if problems:
        print(smoke.stderr[-2000:], file=sys.stderr)
        for problem in problems:
            print(f"error: smoke test of {tags[0]}: {problem}", file=sys.stderr)
        return 1
    for command in push_cmds:
        subprocess.run(command, check=True)
    print(f"{tags[0]}: smoke ok" + ("; pushed " + ", ".join(tags) if push_cmds else ""))
    return 0


def _lint() -> int:
    from release import lint
    from release.workflows import drift

    failed = False
    stale = drift(REPO)
    for rel in stale:
        print(f"{rel}: differs from the generator; run `python -m release workflows`")
    failed |= bool(stale)
    for name, check in (("actionlint", lint.actionlint), ("zizmor", lint.zizmor), ("hadolint", lint.hadolint)):
        findings = check(REPO)
        print(f"{name}: {len(findings)} finding(s)")
        for finding in findings:
            print(f"  {finding}")
        failed |= bool(findings)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
