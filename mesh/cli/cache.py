"""`gpumesh models cache ls|rm`: a node's model cache (downloaded hub repos).

The cache is per node: these talk to the node given by --url (default: the local one).
"""

from __future__ import annotations

import argparse
import time
import urllib.parse
from typing import Any

from .output import Exit, add_client_command, add_group, client_for, gib, print_result, table

__all__ = ["register_under"]


def cmd_cache_ls(args: argparse.Namespace) -> int:
    client = client_for(args)
    answer = client.get("/api/cache")
    downloads = {d["key"]: d for d in client.get("/api/downloads")["data"]
                 if d["state"] not in ("done", "failed")}
    print_result(args, answer, lambda a: _listing(a, downloads))
    return Exit.OK


def _listing(answer: dict[str, Any], downloads: dict[str, dict[str, Any]]) -> str:
    rows = []
    for e in answer["data"]:
        state = "complete" if e["complete"] else f"{e['partial_files']} partial"
        live = downloads.get(f"{answer['root']}/{e['key']}")
        if live:
            state = _progress_words(live)
        rows.append([e["key"], e["repo"], e["revision"], gib(e["bytes"]), state,
                     ", ".join(e["in_use_by"]) or "-", _age(e["last_used"])])
    header = f"model cache of node {answer['node_id']} ({answer['root']})"
    if not rows:
        return header + ": empty"
    return header + "\n" + table(["KEY", "REPO", "REVISION", "SIZE", "STATE", "IN USE BY",
                                  "LAST USED"], rows)


def _progress_words(d: dict[str, Any]) -> str:
    rate = f", {d['rate_bytes_per_s'] / (1 << 20):.1f} MiB/s" if d["rate_bytes_per_s"] else ""
    eta = f", ETA {d['eta_s']:.0f} s" if d.get("eta_s") is not None else ""
    return f"downloading {d['percent'] or 0:.0f}%{rate}{eta}"


def _age(stamp: float | None) -> str:
    if stamp is None:
        return "-"
    seconds = max(0, time.time() - stamp)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit} ago"
    return f"{seconds:.0f} s ago"


def cmd_cache_rm(args: argparse.Namespace) -> int:
    path = "/api/cache/" + urllib.parse.quote(args.key) + ("?force=true" if args.force else "")
    result = client_for(args).delete(path)
    print_result(args, result, lambda r: f"removed {r['removed']} from node {r['node_id']} "
                                         f"({gib(r['bytes'])} freed)")
    return Exit.OK


def register_under(models: argparse.ArgumentParser) -> None:
    """`cache` under `gpumesh models`, which alone still lists the models."""
    groups = models.add_subparsers(title="more", metavar="{cache}",
                                   help="`cache ls|rm`: this node's model cache")
    actions = add_group(groups, "cache", "this node's model cache: `ls`, `rm KEY`", "ls or rm",
                        description="The node's cache of downloaded models (one entry per hub "
                                    "repo and revision, shared by its instances).")
    add_client_command(actions, "ls", cmd_cache_ls, "list the cache: size, state, who uses it")
    rm = add_client_command(actions, "rm", cmd_cache_rm, "remove one entry (KEY from `ls`)")
    rm.add_argument("key", metavar="KEY", help="e.g. huggingface/owner--name/main")
    rm.add_argument("--force", action="store_true",
                    help="remove it even while instances on the node use it")
