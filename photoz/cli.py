"""The ``photoz`` command. Each subcommand imports its room lazily, so
``photoz serve`` never loads torch and ``photoz summary`` never loads the service."""
from __future__ import annotations

import argparse
import sys


def _summary(args) -> int:
    from photoz.model.network.pasquet import VARIANTS, build
    from photoz.model.network.summary import format_summary

    if args.variant not in VARIANTS:
        print(f"unknown variant {args.variant!r}; known: {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    print(format_summary(build(args.variant), args.variant))
    return 0


def _add_summary(sub) -> None:
    p = sub.add_parser("summary", help="print a network variant layer by layer with parameters and FLOPs")
    p.add_argument("--variant", default="pasquet2019", help="network variant (default: pasquet2019)")
    p.set_defaults(func=_summary)


def _add_room_commands(sub) -> None:
    """Subcommands defined next to the code they run (their modules import only argparse)."""
    from photoz.pipeline import cli as pipeline_cli
    from photoz.service import cli as service_cli
    from photoz.training import cli as training_cli

    training_cli.register(sub)
    pipeline_cli.register(sub)
    service_cli.register(sub)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="photoz", description=__doc__.split(".")[0] + ".")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_summary(sub)
    _add_room_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)
