"""`gpumesh usage`: what keys, users and models used (tokens, requests, errors)."""

from __future__ import annotations

import argparse
import urllib.parse
from typing import Any

from .output import add_client_command, client_for, print_result, table

__all__ = ["register"]


def cmd_usage(args: argparse.Namespace) -> int:
    query = {"by": args.by, "since": args.since, "until": args.until, "user": args.user,
             "model": args.model, "key": args.key, "node": args.node}
    path = "/api/usage?" + urllib.parse.urlencode({k: v for k, v in query.items() if v})
    report = client_for(args).get(path)
    print_result(args, report, _human)
    return 0


def _human(report: dict[str, Any]) -> str:
    by = report["by"]
    rows = [[_label(row, by), row["requests"], row["errors"], row["prompt_tokens"],
             row["completion_tokens"], row["total_tokens"]] for row in report["data"]]
    totals = report["totals"]
    rows.append(["total", totals["requests"], totals["errors"], totals["prompt_tokens"],
                 totals["completion_tokens"], totals["total_tokens"]])
    return table([by.upper(), "REQUESTS", "ERRORS", "PROMPT", "COMPLETION", "TOTAL"], rows)


def _label(row: dict[str, Any], by: str) -> str:
    if by == "key":
        return f"{row['key']} ({row['name'] or 'revoked'})"
    return str(row[by])


def register(sub: Any) -> None:
    usage = add_client_command(sub, "usage", cmd_usage, "tokens and requests per key, user, "
                               "model or node")
    usage.add_argument("--by", choices=["key", "user", "model", "node"], default="key",
                       help="group by (default key)")
    usage.add_argument("--since", help="an age (90m, 24h, 7d) or a unix time; usage is kept "
                       "by the hour (default: all)")
    usage.add_argument("--until", help="an age or a unix time (default: now)")
    usage.add_argument("--user", help="only this user")
    usage.add_argument("--model", help="only this model")
    usage.add_argument("--key", help="only this key id")
    usage.add_argument("--node", help="only this node (the one that served)")
