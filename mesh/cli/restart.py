"""`gpumesh restart NAME|INSTANCE`: restart engines, from any node.

The node you talk to records the request (`POST /api/instances/{id}/restart`); the node
that runs the instance restarts its engine when the request reaches it through the
replicated state. With `--wait` the command returns once each instance runs again.
"""

from __future__ import annotations

import argparse
import time
import urllib.parse
from typing import Any

from ..client import ApiClient
from .engines import instances_named
from .output import CliError, Exit, add_client_command, client_for, completes, print_result

__all__ = ["register"]


def cmd_restart(args: argparse.Namespace) -> int:
    client = client_for(args)
    asked = [client.post(f"/api/instances/{urllib.parse.quote(i['id'])}/restart", {})
             for i in instances_named(client, args.target)]
    if args.wait:
        _wait_restarted(client, asked, args.timeout)
    print_result(args, asked, lambda rows: "\n".join(
        f"{'restarted' if args.wait else 'restarting'} {r['restarting']} ({r['model']}) on "
        f"node {r['node']}" + _node_note(r) for r in rows))
    return Exit.OK


def _node_note(answer: dict[str, Any]) -> str:
    status = answer.get("node_status")
    if status in (None, "ready"):
        return ""
    return f" (the node is {status}: it restarts the engine when it is back)"


def _wait_restarted(client: ApiClient, asked: list[dict[str, Any]], timeout: float) -> None:
    """Until every instance's agent has acted on the request and its engine runs again."""
    deadline = time.monotonic() + timeout
    waiting = {a["restarting"]: a["restart_generation"] for a in asked}
    while waiting:
        instances = {i["id"]: i for i in client.get("/api/instances")["data"]}
        for instance_id, generation in list(waiting.items()):
            instance = instances.get(instance_id)
            if instance is None:
                raise CliError(f"instance {instance_id} was removed while it restarted",
                               Exit.ERROR, code="instance_removed")
            if int(instance.get("restart_handled") or 0) < generation:
                continue                          # its node has not acted on it yet
            if instance["state"] == "running":
                del waiting[instance_id]
            elif instance["state"] == "error":
                raise CliError(f"instance {instance_id} did not start again: "
                               f"{instance.get('reason')} (gpumesh keeps retrying)",
                               Exit.ERROR, code="instance_failed")
        if waiting and time.monotonic() > deadline:
            raise CliError(f"not running again after {timeout:g} s: {', '.join(waiting)}",
                           Exit.TIMED_OUT, code="timed_out")
        if waiting:
            time.sleep(0.25)


def register(sub: Any) -> None:
    restart = add_client_command(
        sub, "restart", cmd_restart, "restart an instance's engine, or every instance of a "
        "model, from any node",
        description="Restart engines: one instance, or every instance of a model. Any node "
                    "takes the request; the node that runs the instance restarts it (requests "
                    "it is serving then fail).")
    completes(restart.add_argument("target", metavar="NAME|INSTANCE",
                                   help="a model (all its instances) or one instance id"),
              "models")
    restart.add_argument("--wait", action="store_true",
                         help="return once every restarted instance runs again; else exit "
                              "non-zero with the reason (6 timed out, 1 an instance failed)")
    restart.add_argument("--timeout", type=float, default=600.0, metavar="SECONDS",
                         help="how long --wait waits (default 600)")
