"""`gpumesh version`: this CLI's version, and the node's (and every node's) when reachable.

A rolling upgrade leaves nodes on different versions for a while: with a key, every node's
version is listed, so a script can wait until they agree.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from gpumesh import __version__

from ..client import ApiClient, ApiError
from .output import Exit, add_client_command, client_for, print_result, table

__all__ = ["register"]


def cmd_version(args: argparse.Namespace) -> int:
    report: dict[str, Any] = {"client": {"version": __version__,
                                         "python": ".".join(map(str, sys.version_info[:3]))},
                              "node": None, "nodes": None}
    client = client_for(args, timeout=5.0)
    try:
        health = client.get("/api/health")
        report["node"] = {"url": client.url, "version": health.get("version")}
    except ApiError as exc:
        report["node"] = {"url": client.url, "error": str(exc).split(";")[0]}
    else:
        report["nodes"] = _every_node(client)
    print_result(args, report, _human)
    return Exit.OK


def _every_node(client: ApiClient) -> list[dict[str, Any]] | None:
    try:
        nodes = client.get("/api/nodes")["data"]
    except (ApiError, KeyError, TypeError):
        return None                        # no key, or not an admin: the node's own is enough
    return [{"name": n.get("name"), "id": n.get("id"), "version": n.get("version"),
             "status": n.get("status")} for n in nodes]


def _human(report: dict[str, Any]) -> str:
    lines = [f"gpumesh {report['client']['version']} (client, Python "
             f"{report['client']['python']})"]
    node = report["node"]
    if node.get("version"):
        lines.append(f"gpumesh {node['version']} (node at {node['url']})")
    else:
        lines.append(f"node: not reachable ({node['error']})")
    if report["nodes"]:
        versions = {n["version"] for n in report["nodes"]}
        if len(versions) > 1 or versions != {report["client"]["version"]}:
            lines.append(table(["NODE", "VERSION", "STATUS"],
                               [[n["name"], n["version"], n["status"]] for n in report["nodes"]]))
    return "\n".join(lines)


def register(sub: Any) -> None:
    add_client_command(sub, "version", cmd_version,
                       "this CLI's version, and the node's (every node's, with a key)")
