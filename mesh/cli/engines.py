"""Engine commands: `backends` (what every node has and can install) and `logs`."""

from __future__ import annotations

import argparse
import sys
import urllib.parse
from typing import Any

from .output import (CliError, Exit, add_client_command, client_for, completes, print_result,
                     table)

__all__ = ["instances_named", "register"]


def cmd_backends(args: argparse.Namespace) -> int:
    client = client_for(args)
    if args.local:
        local = client.get("/api/backends")["data"]
        print_result(args, local, lambda bs: table(
            ["ENGINE", "BUILT IN", "INSTALLED", "INSTALLS", "FORMATS", "KINDS", "DEVICES",
             "AVAILABLE"],
            [[b["name"], b.get("builtin_version") or "-", ", ".join(b.get("versions") or []) or "-",
              " ".join(b.get("install_packages") or []) or "-", ",".join(b["model_formats"]),
              ",".join(b.get("kinds") or []), _devices(b),
              "yes" if b["available"] else f"no: {b['problem']}"] for b in bs]))
        return Exit.OK
    nodes = client.get("/api/nodes")["data"]
    rows = [{"node": n["name"], "node_id": n["id"], "engine": name, **traits}
            for n in nodes for name, traits in sorted((n.get("backends") or {}).items())]
    print_result(args, rows, lambda rs: table(
        ["NODE", "ENGINE", "DEFAULT", "VERSIONS", "ON DEMAND", "DEVICES"],
        [[r["node"], r["engine"], r.get("version") or "-", _versions(r),
          "yes" if r.get("installable") else "no", _devices(r)] for r in rs]))
    return Exit.OK


def _versions(traits: dict[str, Any]) -> str:
    """"2026.10.1 (built in), 2026.9.11063" — what can run there without installing."""
    found = [f"{traits['builtin_version']} (built in)"] if traits.get("builtin_version") else []
    return ", ".join(found + list(traits.get("versions") or [])) or "-"


def _devices(traits: dict[str, Any]) -> str:
    return ",".join((["cpu"] if traits.get("runs_on_cpu") else [])
                    + list(traits.get("gpu_vendors") or [])) or "-"


def cmd_logs(args: argparse.Namespace) -> int:
    client = client_for(args)
    instances = instances_named(client, args.target)
    if args.follow and len(instances) > 1:
        raise CliError(f"{args.target} has {len(instances)} instances; follow one of them: "
                       + ", ".join(i["id"] for i in instances), Exit.USAGE)
    query = urllib.parse.urlencode({"tail": args.tail, **({"follow": 1} if args.follow else {})})
    for instance in instances:
        if len(instances) > 1:
            print(f"==> {instance['id']} on node {instance['node_id']} <==", flush=True)
        response = client.stream(f"/api/instances/{urllib.parse.quote(instance['id'])}/logs?"
                                 f"{query}", timeout=None if args.follow else 60)
        with response:
            try:
                for chunk in iter(lambda: response.read1(65536), b""):
                    sys.stdout.buffer.write(chunk)
                    sys.stdout.buffer.flush()
            except KeyboardInterrupt:
                return Exit.OK               # Ctrl-C ends a follow: not an error
    return Exit.OK


def instances_named(client: Any, target: str) -> list[dict[str, Any]]:
    """An instance id, or every instance of the model of that name."""
    instances = client.get("/api/instances")["data"]
    exact = [i for i in instances if i["id"] == target]
    if exact:
        return exact
    of_model = sorted((i for i in instances if i["model"] == target), key=lambda i: i["id"])
    if of_model:
        return of_model
    models = {i["model"] for i in instances}
    raise CliError(f"no instance or model with running instances named {target!r}"
                   + (f" (models with instances: {', '.join(sorted(models))})" if models else ""),
                   Exit.NOT_FOUND, code="not_found")


def register(sub: Any) -> None:
    backends = add_client_command(sub, "backends", cmd_backends,
                                  "engines and versions on every node, and what each can install")
    backends.add_argument("--local", action="store_true",
                          help="the node you talk to, in detail (built-in versions, formats, "
                          "kinds, what it would install)")
    logs = add_client_command(sub, "logs", cmd_logs, "an instance's engine log, from any node")
    completes(logs.add_argument("target", metavar="NAME|INSTANCE",
                                help="a model (all its instances) or one instance id"),
              "models")
    logs.add_argument("-f", "--follow", action="store_true",
                      help="keep printing what the engine writes (Ctrl-C to stop)")
    logs.add_argument("--tail", type=int, default=200, metavar="LINES",
                      help="lines of the end of the log to print first (default 200)")
