"""`slime train ...`: parse and validate the flags, pick the backend, run the loop.

A user mistake (a flag, a file, a plugin path, a missing package) ends with one line on stderr and exit
code 2; a --ci-test invariant violation with exit code 3; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys

EXIT_USAGE = 2
EXIT_INVARIANT = 3


def user_errors() -> tuple[type[BaseException], ...]:
    from slime.backends import BackendUnavailable
    from slime.config import ConfigError
    from slime.plugins import PluginError
    from slime.ray.cluster import ClusterError
    from slime.rollout.data import DataError
    from slime.rollout.engines.base import EngineError

    return (ConfigError, DataError, PluginError, BackendUnavailable, ClusterError, EngineError, FileNotFoundError)


def root_cause(error: BaseException) -> BaseException:
    """The exception a Ray worker raised, out of Ray's wrapper (RayTaskError carries it as .cause)."""
    seen = 0
    while seen < 8 and getattr(error, "cause", None) is not None and isinstance(error.cause, BaseException):
        error, seen = error.cause, seen + 1
    return error


def one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def main(argv: list[str]) -> int:
    from slime.config import build_parser, parse_config
    from slime.invariants import InvariantViolation

    if any(a in ("-h", "--help") for a in argv):
        build_parser().print_help()
        return 0
    try:
        config = parse_config(argv)
        from slime import loop

        summary = loop.train(config)
    except BaseException as raised:
        error = root_cause(raised)
        if isinstance(error, InvariantViolation):
            print(f"error: {one_line(error)}", file=sys.stderr)
            return EXIT_INVARIANT
        if isinstance(error, user_errors()) or (
            isinstance(error, ValueError) and type(error) is ValueError and _is_flag_message(error)
        ):
            print(f"error: {one_line(error)}", file=sys.stderr)
            return EXIT_USAGE
        if isinstance(raised, KeyboardInterrupt):
            print("interrupted", file=sys.stderr)
            return 130
        raise
    print(
        f"done: run folder {summary.output_dir}" + (f", checkpoint {summary.checkpoint}" if summary.checkpoint else ""),
        file=sys.stderr,
    )
    return 0


def _is_flag_message(error: ValueError) -> bool:
    """ValueErrors our own validators raise name a flag (--something)."""
    return str(error).lstrip().startswith("--") or " --" in str(error)
