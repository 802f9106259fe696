"""`gpumesh`: the command line. `up` runs the daemon; the rest talk to a node's API.

Every command prints for people by default and JSON with `--json`; failures exit with the
codes in `output.Exit` (listed in `gpumesh --help`), so scripts can tell "not found" from
"unreachable" without parsing messages.

One module per group of commands; each has `register(subparsers)`, listed in `_GROUPS`.
`output.py` holds what they share (flags, printing, exit codes); its docstring has the rules.
"""

from __future__ import annotations

import argparse
import sys

from gpumesh import __version__
from gpumesh.interrupts import interrupted

from ..client import ApiError
from . import (access, cluster, completion, daemon, doctor, engines, models, restart, tui,
               usage, version)
from .output import EXIT_CODES_HELP, CliError, Exit, error_from_api, print_error

__all__ = ["build_parser", "main"]

# The command groups, in the order `gpumesh --help` lists them.
_GROUPS = (daemon, models, restart, engines, cluster, access, usage, tui, doctor, version,
           completion)


def main(argv: list[str] | None = None) -> int:
    if interrupted():                 # a Ctrl-C while this module imported, swallowed there
        return int(Exit.INTERRUPTED)
    try:
        return _run(argv)
    except KeyboardInterrupt:         # wherever it lands, even while the parser is built
        return int(Exit.INTERRUPTED)


def _run(argv: list[str] | None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["__complete"]:     # live names for shell completion (completion.py)
        from .completion import complete_names
        print("\n".join(complete_names(argv[1] if len(argv) > 1 else "")))
        return Exit.OK
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return Exit.USAGE
    try:
        return int(args.handler(args))
    except CliError as exc:
        print_error(args, exc)
        return int(exc.exit_code)
    except ApiError as exc:
        error = error_from_api(exc)
        print_error(args, error)
        return int(error.exit_code)
    except BrokenPipeError:           # `gpumesh models | head -1`: the reader left, not an error
        sys.stderr.close()
        return int(Exit.OK)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gpumesh", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="A GPU cluster manager for AI models: one daemon per machine, one pool "
                    "of GPUs, an OpenAI-compatible API on every node.",
        epilog="Run `gpumesh COMMAND --help` for a command's flags. Commands that talk to a "
               "node find the local one through its data dir ($GPUMESH_DATA_DIR), or use "
               "$GPUMESH_URL and $GPUMESH_API_KEY.\n\n" + EXIT_CODES_HELP)
    parser.add_argument("--version", action="version", version=f"gpumesh {__version__}")
    parser.set_defaults(command=None)
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")
    for group in _GROUPS:
        group.register(sub)
    return parser


if __name__ == "__main__":
    sys.exit(main())
