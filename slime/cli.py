"""The `slime` command."""

from __future__ import annotations

import argparse
import sys


def _hardware_choices() -> list[str]:
    from slime.backends import backend_names

    return ["auto", *backend_names()]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="slime", description="RL post-training for LLMs")
    sub = parser.add_subparsers(dest="command", required=True)

    env = sub.add_parser("env", help="detected hardware, backends, package versions and satisfied extras")
    env.add_argument("--hardware", default="auto", choices=_hardware_choices())
    env.add_argument("--json", action="store_true", help="machine-readable output")

    sub.add_parser("train", help="run RL training (see `slime train --help`)", add_help=False)
    sub.add_parser(
        "quickstart",
        help="build a tiny model and task locally, SFT then GRPO on it (see `slime quickstart --help`)",
        add_help=False,
    )

    args, rest = parser.parse_known_args(argv)
    if args.command == "env":
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        from slime import env_report

        return env_report.main(args.hardware, args.json)
    if args.command == "train":
        try:
            from slime import train_cli
        except ImportError as exc:
            print(f"error: `slime train` is unavailable: {exc}", file=sys.stderr)
            return 2
        return train_cli.main(rest)
    if args.command == "quickstart":
        from slime.quickstart.run import main as quickstart_main

        return quickstart_main(rest)
    return 2


if __name__ == "__main__":
    sys.exit(main())
