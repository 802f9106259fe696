"""`gpumesh`: the command line. `up` runs the daemon; the rest talk to a node's API.

Every command prints for people by default and JSON with `--json`, exits 0 on success,
1 when gpumesh said no (the reason is printed), and 2 on a usage mistake.

One module per group of commands; each has `register(subparsers)`, listed in `_GROUPS`.
"""

from __future__ import annotations

import argparse
import sys

from gpumesh import __version__

from ..client import ApiError
from . import cluster, daemon, models

__all__ = ["main"]

# The command groups, in the order `gpumesh --help` lists them.
_GROUPS = (daemon, models, cluster)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return args.handler(args)
    except ApiError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpumesh", description="A GPU cluster manager for "
                                     "AI models: one daemon per machine, one pool of GPUs.")
    parser.add_argument("--version", action="version", version=f"gpumesh {__version__}")
    parser.set_defaults(command=None)
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")
    for group in _GROUPS:
        group.register(sub)
    return parser


if __name__ == "__main__":
    sys.exit(main())
