"""`gpumesh`: the command line. `up` runs the daemon; the rest talk to a node's API.

Every command prints for people by default and JSON with `--json`, exits 0 on success,
1 when gpumesh said no (the reason is printed), and 2 on a usage mistake.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

from gpumesh import __version__

from .client import ApiClient, ApiError, model_path
from .config import Config, ConfigError

__all__ = ["main"]


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


# --- commands ------------------------------------------------------------------------------

def cmd_up(args: argparse.Namespace) -> int:
    from .daemon import configure_logging, run_daemon   # the daemon's imports only when needed

    flags = {name: getattr(args, name) for name in
             ("data_dir", "host", "api_port", "raft_port", "node_name", "gpu_probe",
              "reserved_memory_mib", "log_level")}
    try:
        config = Config.from_sources(flags)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    configure_logging(config.log_level)
    return asyncio.run(run_daemon(config))


def cmd_deploy(args: argparse.Namespace) -> int:
    client = _client(args)
    spec: dict[str, Any] = {"name": args.name, "source": _absolute_if_local(args.source),
                            "replicas": args.replicas, "args": args.arg or []}
    if args.backend:
        spec["backend"] = args.backend
    if args.context_length:
        spec["context_length"] = args.context_length
    model = client.post("/api/models", spec)
    if not args.wait:
        _print(args, model, lambda m: f"deployed {m['name']} ({m['backend']}, "
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
            _print(args, model, _describe_ready)
            return 0
        if model["status"] == "unschedulable":
            return _fail(args, model, f"cannot run {name}: {model['schedule_error']}")
        failed = [i for i in model["instances"] if i["state"] == "error"]
        if failed:
            i = failed[0]
            return _fail(args, model, f"instance {i['id']} of {name} failed: {i['reason']} "
                                      f"(gpumesh keeps retrying; `gpumesh rm {name}` removes it)")
        if time.monotonic() > deadline:
            return _fail(args, model, f"{name} is not running after {timeout:.0f} s "
                                      f"(status: {model['status']})")
        time.sleep(0.25)


def _describe_ready(model: dict[str, Any]) -> str:
    where = ", ".join(f"{i['id']} on node {i['node_id']} (port {i['port']})"
                      for i in model["instances"] if i["state"] == "running")
    return f"{model['name']} is {model['status']}: {model['ready_replicas']}/" \
           f"{model['replicas']} replica(s) ready" + (f": {where}" if where else "")


def _fail(args: argparse.Namespace, model: dict[str, Any], message: str) -> int:
    if args.json:
        print(json.dumps({**model, "error": message}, indent=2))
    print(f"error: {message}", file=sys.stderr)
    return 1


def cmd_models(args: argparse.Namespace) -> int:
    models = _client(args).get("/api/models")["data"]
    _print(args, models, lambda ms: _table(
        ["NAME", "STATUS", "READY", "BACKEND", "MEMORY", "SOURCE"],
        [[m["name"], m["status"], f"{m['ready_replicas']}/{m['replicas']}", m["backend"],
          _gib(m["estimate"]["total_bytes"]), _source(m["source"])] for m in ms]))
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    result = _client(args).delete(model_path(args.name))
    _print(args, result, lambda r: f"removed {r['deleted']} "
                                   f"({r['instances_removed']} instance(s) stopped)")
    return 0


def cmd_scale(args: argparse.Namespace) -> int:
    client = _client(args)
    model = client.patch(model_path(args.name), {"replicas": args.replicas})
    if args.wait:
        return _wait_running(client, args, args.name, args.timeout)
    _print(args, model, lambda m: f"{m['name']}: {m['replicas']} replica(s) wanted")
    return 0


def cmd_instances(args: argparse.Namespace) -> int:
    instances = _client(args).get("/api/instances")["data"]
    _print(args, instances, lambda items: _table(
        ["ID", "MODEL", "NODE", "STATE", "DEVICE", "PORT", "REASON"],
        [[i["id"], i["model"], i["node_id"], i["state"], i["allocation"]["device"],
          i["port"] or "-", (i.get("reason") or "")[:60]] for i in items]))
    return 0


def cmd_nodes(args: argparse.Namespace) -> int:
    nodes = _client(args).get("/api/nodes")["data"]
    _print(args, nodes, lambda ns: _table(
        ["ID", "NAME", "STATUS", "CPUS", "RAM", "GPUS", "API"],
        [[n["id"], n["name"], n["status"], n["inventory"]["cpu_cores"],
          _gib(n["inventory"]["memory_total_bytes"]), len(n["inventory"]["gpus"]),
          n["api_url"]] for n in ns]))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    status = _client(args).get("/api/status")
    raft = status["raft"]
    _print(args, status, lambda s: (
        f"gpumesh {s['version']} · node {s['node_id']} · up {s['uptime_s']:.0f} s\n"
        f"raft: leader {raft['leader'] or 'none'} · term {raft['term']} · "
        f"{len(raft['members'])} member(s) · quorum {'yes' if raft['has_quorum'] else 'NO'}\n"
        f"{s['counts']['nodes']} node(s), {s['counts']['models']} model(s), "
        f"{s['counts']['instances']} instance(s)"))
    return 0


def cmd_backends(args: argparse.Namespace) -> int:
    backends = _client(args).get("/api/backends")["data"]
    _print(args, backends, lambda bs: _table(
        ["NAME", "VERSION", "FORMATS", "DEVICES", "AVAILABLE"],
        [[b["name"], b["version"] or "-", ",".join(b["model_formats"]),
          ",".join((["cpu"] if b["runs_on_cpu"] else []) + b["gpu_vendors"]),
          "yes" if b["available"] else f"no: {b['problem']}"] for b in bs]))
    return 0


# --- output helpers ------------------------------------------------------------------------

def _client(args: argparse.Namespace) -> ApiClient:
    return ApiClient(url=args.url, api_key=args.api_key)


def _print(args: argparse.Namespace, data: Any, human: Callable[[Any], str]) -> None:
    print(json.dumps(data, indent=2) if args.json else human(data))


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [headers] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells)


def _gib(count: int) -> str:
    return f"{count / (1 << 30):.2f} GiB"


def _source(source: dict[str, Any]) -> str:
    return source["path"] if source["kind"] == "local" else f"hf://{source['repo']}"


# --- the parser ----------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpumesh", description="A GPU cluster manager for "
                                     "AI models: one daemon per machine, one pool of GPUs.")
    parser.add_argument("--version", action="version", version=f"gpumesh {__version__}")
    parser.set_defaults(command=None)
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")

    up = sub.add_parser("up", help="run the daemon on this machine (foreground)")
    up.add_argument("--data-dir", help="state, keys and logs (default ~/.local/share/gpumesh; "
                    "env GPUMESH_DATA_DIR)")
    up.add_argument("--host", help="address for the API and Raft ports (default 127.0.0.1)")
    up.add_argument("--api-port", type=int, help="API port (default 8470)")
    up.add_argument("--raft-port", type=int, help="Raft port (default 8471)")
    up.add_argument("--node-name", help="a name for people (default: the hostname)")
    up.add_argument("--gpu-probe", choices=["auto", "nvidia", "amd", "cpu"],
                    help="which GPUs to look for (default auto: NVIDIA, then AMD, then none)")
    up.add_argument("--reserved-memory-mib", type=int,
                    help="RAM the scheduler leaves to the system (default 1024)")
    up.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    up.set_defaults(command="up", handler=cmd_up)

    def client_command(name: str, handler: Callable, help_: str,
                       aliases: tuple[str, ...] = ()) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, aliases=list(aliases))
        p.add_argument("--url", help="a node's API (default $GPUMESH_URL or the local node)")
        p.add_argument("--api-key", help="admin API key (default $GPUMESH_API_KEY or the "
                       "local node's admin.key)")
        p.add_argument("--json", action="store_true", help="print JSON for scripts")
        p.set_defaults(command=name, handler=handler)
        return p

    deploy = client_command("deploy", cmd_deploy, "deploy a model from a path or a repo")
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

    rm = client_command("rm", cmd_rm, "remove a model and stop its instances")
    rm.add_argument("name")
    scale = client_command("scale", cmd_scale, "change a model's replica count")
    scale.add_argument("name")
    scale.add_argument("replicas", type=int)
    _wait_flags(scale)
    client_command("models", cmd_models, "list models", aliases=("ls",))
    client_command("instances", cmd_instances, "list instances")
    client_command("nodes", cmd_nodes, "list nodes")
    client_command("status", cmd_status, "cluster status as this node sees it")
    client_command("backends", cmd_backends, "engines this node can run")
    return parser


def _wait_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--wait", action="store_true",
                        help="return when running; exit 1 with the reason if it cannot run")
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="seconds --wait waits (default 600)")


if __name__ == "__main__":
    sys.exit(main())
