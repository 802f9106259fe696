"""Model commands: `deploy`, `models` (`ls`), `rm`, `scale`, `instances`."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from ..client import ApiClient, model_path
from .output import (add_client_command, client_for, fail, gib, print_result, source_label,
                     table)

__all__ = ["register"]


def cmd_deploy(args: argparse.Namespace) -> int:
    client = client_for(args)
    spec: dict[str, Any] = {"name": args.name, "source": _absolute_if_local(args.source),
                            "replicas": args.replicas, "args": args.arg or []}
    if args.backend:
        spec["backend"] = args.backend
    if args.context_length:
        spec["context_length"] = args.context_length
    model = client.post("/api/models", spec)
    if not args.wait:
        print_result(args, model, lambda m: f"deployed {m['name']} ({m['backend']}, "
                                      f"{m['replicas']} replica(s)); status: {m['status']}")
        return 0
    return _wait_running(client, args, model["name"], args.timeout)


def _absolute_if_local(source: str) -> str:
    """`./model.gguf` means the file beside the user's shell, not beside the daemon."""
    path = Path(source).expanduser()
    return str(path.resolve()) if path.exists() else source


def _wait_running(client: ApiClient, args: argparse.Namespace, name: str,
                  timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while True:
        model = client.get(model_path(name))
        if model["status"] in ("running", "stopped"):
            print_result(args, model, _describe_ready)
            return 0
        if model["status"] == "unschedulable":
            return fail(args, model, f"cannot run {name}: {model['schedule_error']}")
        failed = [i for i in model["instances"] if i["state"] == "error"]
        if failed:
            i = failed[0]
            return fail(args, model, f"instance {i['id']} of {name} failed: {i['reason']} "
                                      f"(gpumesh keeps retrying; `gpumesh rm {name}` removes it)")
        if time.monotonic() > deadline:
            return fail(args, model, f"{name} is not running after {timeout:.0f} s "
                                      f"(status: {model['status']})")
        time.sleep(0.25)


def _describe_ready(model: dict[str, Any]) -> str:
    where = ", ".join(f"{i['id']} on node {i['node_id']} (port {i['port']})"
                      for i in model["instances"] if i["state"] == "running")
    return f"{model['name']} is {model['status']}: {model['ready_replicas']}/" \
           f"{model['replicas']} replica(s) ready" + (f": {where}" if where else "")


def cmd_models(args: argparse.Namespace) -> int:
    models = client_for(args).get("/api/models")["data"]
    print_result(args, models, lambda ms: table(
        ["NAME", "STATUS", "READY", "BACKEND", "MEMORY", "SOURCE"],
        [[m["name"], m["status"], f"{m['ready_replicas']}/{m['replicas']}", m["backend"],
          gib(m["estimate"]["total_bytes"]), source_label(m["source"])] for m in ms]))
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    result = client_for(args).delete(model_path(args.name))
    print_result(args, result, lambda r: f"removed {r['deleted']} "
                                   f"({r['instances_removed']} instance(s) stopped)")
    return 0


def cmd_scale(args: argparse.Namespace) -> int:
    client = client_for(args)
    model = client.patch(model_path(args.name), {"replicas": args.replicas})
    if args.wait:
        return _wait_running(client, args, args.name, args.timeout)
    print_result(args, model, lambda m: f"{m['name']}: {m['replicas']} replica(s) wanted")
    return 0


def cmd_instances(args: argparse.Namespace) -> int:
    instances = client_for(args).get("/api/instances")["data"]
    print_result(args, instances, lambda items: table(
        ["ID", "MODEL", "NODE", "STATE", "DEVICE", "PORT", "REASON"],
        [[i["id"], i["model"], i["node_id"], i["state"], i["allocation"]["device"],
          i["port"] or "-", (i.get("reason") or "")[:60]] for i in items]))
    return 0


def register(sub: Any) -> None:
    deploy = add_client_command(sub, "deploy", cmd_deploy, "deploy a model from a path or a repo")
    deploy.add_argument("source", metavar="PATH_OR_REPO",
                        help="a local GGUF file/dir, or a Hugging Face repo (owner/name[:file])")
    deploy.add_argument("--name", required=True, help="the name clients use as `model`")
    deploy.add_argument("--backend", help="engine to use (default: chosen by model format)")
    deploy.add_argument("--replicas", type=int, default=1, help="instances to run (default 1)")
    deploy.add_argument("--context-length", type=int, help="context window (default: the "
                        "model's, at most 4096)")
    deploy.add_argument("--arg", action="append", metavar="ENGINE_ARG",
                        help="extra engine argument (repeatable), e.g. --arg=--embeddings")
    _wait_flags(deploy)

    rm = add_client_command(sub, "rm", cmd_rm, "remove a model and stop its instances")
    rm.add_argument("name")
    scale = add_client_command(sub, "scale", cmd_scale, "change a model's replica count")
    scale.add_argument("name")
    scale.add_argument("replicas", type=int)
    _wait_flags(scale)
    add_client_command(sub, "models", cmd_models, "list models", aliases=("ls",))
    add_client_command(sub, "instances", cmd_instances, "list instances")


def _wait_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--wait", action="store_true",
                        help="return when running; exit 1 with the reason if it cannot run")
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="seconds --wait waits (default 600)")
