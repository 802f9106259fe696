"""`gpumesh tui`: the console (the Textual app in `gpumesh.tui`), attached to a node."""

from __future__ import annotations

import argparse
from typing import Any

from ..client import ApiClient, ApiError, resolve_target
from .output import CliError, Exit, error_from_api

__all__ = ["register"]


def cmd_tui(args: argparse.Namespace) -> int:
    target = resolve_target(args.url, args.key)
    if not target.api_key:
        raise CliError(f"no admin API key for {target.url}: pass --key, set GPUMESH_API_KEY, "
                       f"or run on a node (its key is in {target.data_dir}/admin.key)",
                       Exit.NOT_AUTHORISED)
    try:
        # Once, before the screen is taken: a wrong URL or key is a one-line error, not a
        # console that reconnects forever. After this the console reconnects by itself.
        ApiClient(target.url, target.api_key, timeout=5).get("/api/status")
    except ApiError as exc:
        error = error_from_api(exc)
        raise CliError(f"{error} (from {target.url_from})", error.exit_code) from None
    from gpumesh.tui import run                   # Textual loads only for this command
    return run(target.url, target.api_key, mouse=not args.no_mouse, theme=args.theme)


def register(sub: Any) -> None:
    p = sub.add_parser("tui", help="the console: nodes, GPUs, models, instances, keys, usage",
                       description="A full-screen console attached to one node, managing the "
                       "whole cluster from there. Keys: 1-6 views, ? help, / filter, : or "
                       "ctrl+p commands, esc back, q quit.")
    p.add_argument("--url", help="a node's API, e.g. 10.0.0.5:8470 (default: $GPUMESH_URL, "
                   "else the local node found through its data dir)")
    p.add_argument("--key", "--api-key", dest="key", help="admin API key (default: "
                   "$GPUMESH_API_KEY, else the local data dir's admin.key)")
    p.add_argument("--no-mouse", action="store_true", help="leave the mouse to the terminal "
                   "(select text as usual)")
    p.add_argument("--theme", help="a Textual theme, e.g. ansi-dark (the terminal's own 16 "
                   "colours; chosen by itself on 16-colour terminals)")
    p.set_defaults(command="tui", handler=cmd_tui)
