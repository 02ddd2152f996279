"""`slime train ...`: parse the flags, check everything the run is given, pick the backend, run the loop.

`slime train --check` stops after the checks (exit 0). `slime train --help-errors` prints what each kind of
mistake prints. A user mistake (`slime.errors.UserError`: a flag, a data file, the model folder, a missing
package) ends with one line on stderr and exit code 2, also when a Ray worker raised it; a user's plugin that
fails at run time (`slime.plugin_failures.PluginFailure`) with its own traceback, then one line naming it, the
sample and the rollout, and exit code 1; a --ci-test
invariant violation ends with exit code 3; a run fault (`slime.errors.RunFault`: a trainer's host lost) with exit code 4
and the checkpoint to resume from; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys

EXIT_PLUGIN = 1
EXIT_USAGE = 2
EXIT_INVARIANT = 3
EXIT_FAULT = 4
CHECK_FLAG = "--check"
HELP_ERRORS_FLAG = "--help-errors"


def main(argv: list[str]) -> int:
    from slime.config import build_parser

    if any(a in ("-h", "--help") for a in argv):
        build_parser().print_help()
        return 0
    if HELP_ERRORS_FLAG in argv:
        from slime.preflight.error_table import render_table

        print(render_table())
        return 0
    check_only = CHECK_FLAG in argv
    argv = [a for a in argv if a != CHECK_FLAG]
    try:
        return _run(argv, check_only)
    except BaseException as raised:
        return _exit_code(raised)


def _run(argv: list[str], check_only: bool) -> int:
    from slime.config import parse_config
    from slime.preflight import check_run

    config = parse_config(argv)
    checked = check_run(config)
    if check_only:
        for line in checked.notes:
            print(f"note: {line}", file=sys.stderr)
        print(checked.describe(), file=sys.stderr)
        return 0
    from slime import loop

    summary = loop.train(config, checked.backend, checked)
    print(
        f"done: run folder {summary.output_dir}" + (f", checkpoint {summary.checkpoint}" if summary.checkpoint else ""),
        file=sys.stderr,
    )
    return 0


def _exit_code(raised: BaseException) -> int:
    """Exit code for what ended the run, with its one line printed; re-raises a bug (traceback kept)."""
    from slime.errors import RunFault, one_line, unwrap, user_error_in
    from slime.invariants import InvariantViolation
    from slime.plugin_failures import plugin_failure_in

    user_error = user_error_in(raised)
    if user_error is not None:
        print(f"error: {one_line(user_error)}", file=sys.stderr)
        return EXIT_USAGE
    failure = plugin_failure_in(raised)
    if failure is not None:  # the user's code: its traceback, then the line naming it
        print(f"{failure.user_traceback}error: {failure.line()}", file=sys.stderr)
        return EXIT_PLUGIN
    if isinstance(unwrap(raised), InvariantViolation):
        print(f"error: {one_line(unwrap(raised))}", file=sys.stderr)
        return EXIT_INVARIANT
    if isinstance(raised, RunFault):
        print(f"error: {one_line(raised)}", file=sys.stderr)
        return EXIT_FAULT
    if isinstance(raised, KeyboardInterrupt):
        print("interrupted", file=sys.stderr)
        return 130
    raise raised
