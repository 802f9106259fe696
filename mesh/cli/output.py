"""What every CLI command shares: the client it talks through, its common flags, and the
printing rules (tables for people, JSON with `--json`)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable

from ..client import ApiClient

__all__ = ["add_client_command", "client_for", "fail", "gib", "print_result",
           "source_label", "table"]



def add_client_command(sub: Any, name: str, handler: Callable[[argparse.Namespace], int],
                       help_: str, aliases: tuple[str, ...] = ()) -> argparse.ArgumentParser:
    """A subcommand that talks to a node's API: --url, --api-key and --json come with it."""
    p = sub.add_parser(name, help=help_, aliases=list(aliases))
    p.add_argument("--url", help="a node's API (default $GPUMESH_URL or the local node)")
    p.add_argument("--api-key", help="admin API key (default $GPUMESH_API_KEY or the "
                   "local node's admin.key)")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    p.set_defaults(command=name, handler=handler)
    return p


def client_for(args: argparse.Namespace) -> ApiClient:
    return ApiClient(url=args.url, api_key=args.api_key)


def print_result(args: argparse.Namespace, data: Any, human: Callable[[Any], str]) -> None:
    print(json.dumps(data, indent=2) if args.json else human(data))


def fail(args: argparse.Namespace, data: dict[str, Any], message: str) -> int:
    if args.json:
        print(json.dumps({**data, "error": message}, indent=2))
    print(f"error: {message}", file=sys.stderr)
    return 1


def table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [headers] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells)


def gib(count: int) -> str:
    return f"{count / (1 << 30):.2f} GiB"


def source_label(source: dict[str, Any]) -> str:
    return source["path"] if source["kind"] == "local" else f"hf://{source['repo']}"
