"""python -m release <command>: versions, build/check/publish, image tags and builds, workflow generation, CI steps,
and the resolution of every extra (resolve). Each subcommand in COMMANDS carries its arguments and its handler.

Every user mistake ends in one line on stderr and exit status 2; a failed check exits 1.
"""

from __future__ import annotations

import argparse
import datetime
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from release.build import wheel_prefix
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


def _channel_and_date(p: argparse.ArgumentParser, choices: tuple[str, ...] = ("release", "nightly", "dev")) -> None:
    p.add_argument("--channel", choices=choices, default="dev")
    p.add_argument("--date", type=_date, help="build date for nightly (default: today, UTC)")


def _version(channel: str, date: datetime.date | None) -> str:
    from release.version import compute_version, declared_version, read_git_state

    date = date or datetime.datetime.now(datetime.UTC).date()
    return compute_version(read_git_state(REPO), channel, declared_version(REPO), date)


def _print_problems(problems: list[str], ok_line: str) -> int:
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    if not problems:
        print(ok_line)
    return 1 if problems else 0


# ---- one handler per subcommand; each Command below pairs its arguments with its handler ----------------------
def _cmd_version(args: argparse.Namespace) -> int:
    print(_version(args.channel, args.date))
    return 0


def _cmd_build(args: argparse.Namespace) -> int:
    from release.build import build

    date = args.date or datetime.datetime.now(datetime.UTC).date()
    version = _version(args.channel, date)
    dists = build(REPO, version, args.outdir)
    print(f"built {dists.sdist.name} and {dists.wheel.name} in {args.outdir}")
    _write_outputs(args.github_output, {"version": version, "date": date.isoformat()})
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    from release.build import inspect_sdist, inspect_wheel, twine_check
    from release.publish import version_of

    twine_check(args.dists)
    problems = []
    for dist in args.dists:
        if dist.suffix == ".whl":
            problems += inspect_wheel(dist, version_of(dist))
        elif dist.name.endswith(".tar.gz"):
            problems += inspect_sdist(dist)
    return _print_problems(problems, f"ok: {', '.join(d.name for d in args.dists)}")


def _cmd_publish(args: argparse.Namespace) -> int:
    from release.publish import publish

    print(publish(args.dists, args.repository_url, args.simple_url, args.skip_existing))
    return 0


def _cmd_exists(args: argparse.Namespace) -> int:
    from release.publish import check_ownership, existing_files, files_on_index, version_of

    listed = files_on_index(args.simple_url)
    check_ownership(listed, args.simple_url)
    present = existing_files(args.dists, listed)
    _write_outputs(args.github_output, {"exists": "true" if present else "false"})
    if present and not args.skip_existing:
        print(f"error: version {version_of(args.dists[0])} already exists on {args.simple_url}", file=sys.stderr)
        return 1
    print(f"{'already there, skipping' if present else 'not there yet'}: {', '.join(d.name for d in args.dists)}")
    return 0


def _cmd_smoke_check(args: argparse.Namespace) -> int:
    from release.images import check_smoke_output

    problems = check_smoke_output(args.hardware, args.report.read_text(), args.version)
    return _print_problems(problems, f"smoke ok: backend {args.hardware} usable")


def _cmd_workflows(args: argparse.Namespace) -> int:
    from release.workflows import drift, write

    if not args.check:
        written = write(REPO)
        print("wrote " + ", ".join(written) if written else "workflows already up to date")
        return 0
    stale = drift(REPO)
    if stale:
        print(
            f"error: {', '.join(stale)} differ from the generator; run `python -m release workflows`", file=sys.stderr
        )
        return 1
    print("workflows match the registry")
    return 0


def _cmd_perf(args: argparse.Namespace) -> int:
    from release.nightly import perf_command

    return perf_command(REPO, args.hardware, args.out, args.history, args.only, args.records, args.timeout)


def _cmd_ci(args: argparse.Namespace) -> int:
    from release.ci import main as ci_main

    return ci_main(args.step)


def _cmd_resolve(args: argparse.Namespace) -> int:
    from release.resolve import Options, format_table, run

    options = Options(args.index_url, args.cpu_torch_index, tuple(args.interpreter), args.timeout, args.reports)
    outcomes, notes = run(REPO, args.extra, args.python, options)
    print(format_table(outcomes))
    for note in notes:
        print(f"note: {note}")
    failed = [f"{o.extra}/{o.python}" for o in outcomes if not o.ok]
    if failed:
        print(f"error: no working stack for {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


# ---- arguments ---------------------------------------------------------------------------------------------
def _args_build(p: argparse.ArgumentParser) -> None:
    _channel_and_date(p)
    p.add_argument("--outdir", type=Path, default=REPO / "dist")
    p.add_argument("--github-output", type=Path, help="append version= and date= lines here")


def _args_publish(p: argparse.ArgumentParser) -> None:
    p.add_argument("dists", nargs="+", type=Path)
    p.add_argument("--repository-url", required=True, help="upload endpoint, e.g. https://upload.pypi.org/legacy/")
    p.add_argument("--simple-url", help="the index's simple page, checked for the version before uploading")
    p.add_argument("--skip-existing", action="store_true", help="skip files whose version is already there")


def _args_exists(p: argparse.ArgumentParser) -> None:
    p.add_argument("dists", nargs="+", type=Path)
    p.add_argument("--simple-url", required=True)
    p.add_argument("--skip-existing", action="store_true")
    p.add_argument("--github-output", type=Path)


def _args_image(p: argparse.ArgumentParser, build: bool) -> None:
    p.add_argument("--hardware", required=True)
    p.add_argument("--channel", choices=("release", "nightly"), required=True)
    p.add_argument("--version", required=True)
    p.add_argument("--date", type=_date)
    p.add_argument("--repository", default=None)
    if build:
        p.add_argument("--push", action="store_true")
        p.add_argument("--dry-run", action="store_true", help="print the docker commands, run nothing")
        p.add_argument("--dist", type=Path, default=REPO / "dist")


def _args_smoke_check(p: argparse.ArgumentParser) -> None:
    p.add_argument("--hardware", required=True)
    p.add_argument("--version")
    p.add_argument("report", type=Path)


def _args_perf(p: argparse.ArgumentParser) -> None:
    p.add_argument("--hardware", required=True, choices=ALL_HARDWARE)
    p.add_argument("--out", type=Path, required=True, help="folder for the benchmark JSON, records, report")
    p.add_argument("--history", type=Path, help="JSONL of earlier nights' records (tonight's are appended)")
    p.add_argument("--only", nargs="+", help="run only these benchmarks")
    p.add_argument("--records", type=Path, help="gate and report these records instead of running the benchmarks")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per benchmark")


def _args_resolve(p: argparse.ArgumentParser) -> None:
    # release.resolve needs `packaging`; the parser is built on bare runners too (`release ci`), so no import here
    p.add_argument("--extra", nargs="+", choices=ALL_HARDWARE, help="only these extras (default: all)")
    p.add_argument("--python", nargs="+", help="only these Python versions, e.g. 3.12 (default: each supported)")
    p.add_argument("--index-url", default="https://pypi.org/simple/", help="the index to resolve against")
    p.add_argument("--cpu-torch-index", help="extra index with the CPU torch build, e.g. the PyTorch CPU index")
    p.add_argument("--interpreter", action="append", default=[], help="a python3.X with pip (python3.X on PATH)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per pip run")
    p.add_argument("--reports", type=Path, help="keep pip's report JSON of each target in this folder")


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    handler: Callable[[argparse.Namespace], int]
    arguments: Callable[[argparse.ArgumentParser], None] = lambda p: None


COMMANDS = (
    Command("version", "print the version this checkout builds as", _cmd_version, _channel_and_date),
    Command("build", "build sdist + wheel from the tracked files, stamped with the version", _cmd_build, _args_build),
    Command(
        "check",
        "twine check --strict and inspect wheel/sdist contents",
        _cmd_check,
        lambda p: p.add_argument("dists", nargs="+", type=Path),
    ),
    Command(
        "publish", "upload with twine; credentials from TWINE_USERNAME / TWINE_PASSWORD", _cmd_publish, _args_publish
    ),
    Command(
        "exists",
        "whether the dists' version is already on an index (refuses unless --skip-existing)",
        _cmd_exists,
        _args_exists,
    ),
    Command(
        "image-tags",
        "the tags an image is pushed under",
        lambda a: _image(a, build=False),
        lambda p: _args_image(p, False),
    ),
    Command(
        "image",
        "docker build, smoke-test, and (with --push) push one image",
        lambda a: _image(a, build=True),
        lambda p: _args_image(p, True),
    ),
    Command("smoke-check", "check the JSON of `slime env --json --hardware HW`", _cmd_smoke_check, _args_smoke_check),
    Command(
        "workflows",
        "write .github/ from the test registry (--check: fail on drift)",
        _cmd_workflows,
        lambda p: p.add_argument("--check", action="store_true"),
    ),
    Command("lint", "workflow drift, actionlint, zizmor --offline, hadolint", lambda a: _lint()),
    Command(
        "perf",
        "nightly performance: run the benchmarks, gate them, report (see release/perf_gate.py)",
        _cmd_perf,
        _args_perf,
    ),
    Command(
        "ci",
        "a workflow step: changes, gate, health, wait, finish",
        _cmd_ci,
        lambda p: p.add_argument("step", choices=("changes", "gate", "health", "wait", "finish")),
    ),
    Command(
        "resolve",
        "pip's resolver (dry run) for every extra x Python: is each a working stack?",
        _cmd_resolve,
        _args_resolve,
    ),
)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m release", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        q = sub.add_parser(command.name, help=command.help)
        command.arguments(q)
        q.set_defaults(handler=command.handler)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.handler(args)
    except Exception as exc:  # the release errors below carry one-line, user-facing messages
        from release.build import BuildError
        from release.lint import ToolMissing
        from release.publish import PublishError
        from release.version import VersionError

        if isinstance(exc, (BuildError, PublishError, VersionError, ToolMissing, ValueError)):
            print(f"error: {exc}", file=sys.stderr)
            return 2
        raise


def _image(args: argparse.Namespace, build: bool) -> int:
    from release.images import DEFAULT_REPOSITORY, build_command, check_smoke_output, image_tags, smoke_run_command

    tags = image_tags(args.repository or DEFAULT_REPOSITORY, args.hardware, args.version, args.channel, args.date)
    if not build:
        print("\n".join(tags))
        return 0
    wheels = sorted(args.dist.glob(f"{wheel_prefix()}-{args.version}-*.whl"))
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
