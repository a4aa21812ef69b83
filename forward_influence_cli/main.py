"""The parser, assembled from the command groups, and the error contract of every command."""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Sequence

from forward_influence.errors import InputError

from . import __doc__ as OVERVIEW
from . import compress, evaluation, experiments, measure, prepare
from .options import Parser
from .outputs import check_distinct

GROUPS = (prepare, measure, compress, experiments, evaluation)
COMMANDS = {name: run for group in GROUPS for name, run in group.COMMANDS.items()}


def build_parser() -> Parser:
    parser = Parser(
        prog="forward-influence", description=OVERVIEW, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for group in GROUPS:

        def command(name: str, help_text: str, group=group) -> argparse.ArgumentParser:
            return sub.add_parser(
                name, help=help_text, description=help_text, epilog=f"example: {group.EXAMPLES[name]}"
            )

        group.add(command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    debug = "--debug" in (sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
        check_distinct(args)
        return COMMANDS[args.command](args) or 0
    except InputError as exc:
        if debug:
            traceback.print_exc()
        print(f"error: {exc.command_line()}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a failure of the run, not of the input
        if debug:
            traceback.print_exc()
        reason = " ".join(str(exc).split())
        print(f"error: {type(exc).__name__}: {reason}" if reason else f"error: {type(exc).__name__}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
