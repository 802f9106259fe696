"""Model commands: `deploy`, `models` (`ls`), `rm`, `scale`, `instances`."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from ..client import ApiClient, ApiError, model_path
from . import cache, placement
from .output import (CliError, Exit, add_client_command, client_for, completes, gib, print_result,
                     source_label, status_cell, table)

__all__ = ["register", "wait_running"]


def cmd_deploy(args: argparse.Namespace) -> int:
    if args.file:
        given = [flag for flag, value in (("PATH_OR_REPO", args.source), ("--name", args.name),
                                          ("--backend", args.backend),
                                          ("--context-length", args.context_length),
                                          ("--arg", args.arg), ("--replicas", args.replicas))
                 if value is not None] + placement.given_flags(args)
        if given:
            raise CliError(f"-f takes every field from the file; drop {', '.join(given)}",
                           Exit.USAGE)
        from .specfile import apply_spec_file      # only `deploy -f` needs YAML
        return apply_spec_file(args)
    if not args.source:
        raise CliError("deploy needs PATH_OR_REPO, or -f SPEC.yaml", Exit.USAGE)
    if args.replace:
        raise CliError("--replace goes with -f (a plain deploy of an existing name is "
                       "refused; `gpumesh rm NAME` first)", Exit.USAGE)
    client = client_for(args)
    spec: dict[str, Any] = {"source": absolute_if_local(args.source),
                            "replicas": 1 if args.replicas is None else args.replicas,
                            "args": args.arg or []}
    for field in ("name", "backend", "context_length", "kind", "image"):
        if getattr(args, field) is not None:
            spec[field] = getattr(args, field)
    spec.update(placement.spec_fields(args))
    if args.dry_run:
        return placement.dry_run(args, client, spec)
    model = client.post("/api/models", spec)
    if not args.json:
        for note in model.get("notes") or ():      # e.g. read from the node's cache, offline
            print(f"note: {note}", file=sys.stderr, flush=True)
    if not args.wait:
        print_result(args, model, lambda m: f"deployed {m['name']} ({m['backend']}, "
                                      f"{m['replicas']} replica(s)); status: {m['status']}")
        return Exit.OK
    model = wait_running(client, model["name"], args.timeout)
    print_result(args, model, describe_ready)
    return Exit.OK


def absolute_if_local(source: str, base: Path | None = None) -> str:
    """`./model.gguf` means the file beside the user's shell (or spec file), not beside the
    daemon."""
    path = Path(source).expanduser()
    if base is not None and not path.is_absolute():
        path = base / path
    return str(path.resolve()) if path.exists() else source


def wait_running(client: ApiClient, name: str, timeout: float) -> dict[str, Any]:
    """Poll until `name` runs (or is stopped on purpose); raise CliError saying why not."""
    deadline = time.monotonic() + timeout
    shown: set[str] = set()
    while True:
        model = client.get(model_path(name))
        _show_installs(model, shown)
        if model["status"] in ("running", "stopped", "idle"):   # idle: starts on demand
            return model
        if model["status"] == "unschedulable":
            raise CliError(f"cannot run {name}: {model['schedule_error']}",
                           Exit.NOT_SCHEDULABLE, data={"model": model}, code="unschedulable")
        failed = [i for i in model["instances"] if i["state"] == "error"]
        if failed:
            i = failed[0]
            raise CliError(f"instance {i['id']} of {name} failed: {i['reason']} (gpumesh "
                           f"keeps retrying; `gpumesh rm {name}` removes it)", Exit.ERROR,
                           data={"model": model}, code="instance_failed")
        if time.monotonic() > deadline:
            raise CliError(f"{name} is not running after {timeout:g} s (status: "
                           f"{model['status']})", Exit.TIMED_OUT, data={"model": model},
                           code="timed_out")
        time.sleep(0.25)


def _show_installs(model: dict[str, Any], shown: set[str]) -> None:
    """An engine version being installed for the model takes a while: say what it is doing
    (on stderr, each new step once)."""
    for instance in model["instances"]:
        progress = instance.get("progress") or {}
        if instance["state"] != "installing" or not progress.get("step"):
            continue
        line = f"{instance['id']}: {progress['step']}"
        if line not in shown:
            shown.add(line)
            print(f"  installing ({progress.get('elapsed_s', 0):.0f} s) {line}",
                  file=sys.stderr, flush=True)
    _show_downloads(model, shown)


def _show_downloads(model: dict[str, Any], shown: set[str]) -> None:
    """A download's progress (bytes, rate, ETA) on stderr, each time it moves on by a tenth."""
    for instance in model["instances"]:
        download = instance.get("download")
        if instance["state"] != "downloading" or not download:
            continue
        step = f"{instance['id']}: download {int((download.get('percent') or 0) // 10)}"
        if step not in shown:
            shown.add(step)
            print(f"  {instance['id']}: {_why(instance)}", file=sys.stderr, flush=True)


def describe_ready(model: dict[str, Any]) -> str:
    where = ", ".join(f"{i['id']} on node {i['node_id']} (port {i['port']})"
                      for i in model["instances"] if i["state"] == "running")
    return f"{model['name']} is {model['status']}: {model['ready_replicas']}/" \
           f"{model['replicas']} replica(s) ready" + (f": {where}" if where else "")


def cmd_models(args: argparse.Namespace) -> int:
    models = client_for(args).get("/api/models")["data"]
    print_result(args, models, lambda ms: table(
        ["NAME", "STATUS", "READY", "KIND", "BACKEND", "MEMORY", "SOURCE"],
        [[m["name"], status_cell(m["status"]), f"{m['ready_replicas']}/{m['replicas']}",
          m.get("kind") or "llm", _backend_label(m), gib(m["estimate"]["total_bytes"]),
          source_label(m["source"])]
         for m in ms]))
    return Exit.OK


def cmd_show(args: argparse.Namespace) -> int:
    model = client_for(args).get(model_path(args.name))
    print_result(args, model, _describe_model)
    return Exit.OK


def _describe_model(m: dict[str, Any]) -> str:
    est = m["estimate"]
    lines = [f"{m['name']}: {m['status']}, {m['ready_replicas']}/{m['replicas']} replica(s) "
             f"ready",
             f"  source   {source_label(m['source'])} ({m['format']}, {m.get('kind') or 'llm'})",
             f"  backend  {_backend_label(m)}" + (f" {' '.join(m['args'])}" if m["args"] else ""),
             f"  context  {est.get('context_length') or m.get('context_length') or '-'} tokens",
             f"  memory   {gib(est['total_bytes'])} (weights {gib(est['weights_bytes'])}, "
             f"KV cache {gib(est['kv_cache_bytes'])})"]
    if m.get("schedule_error"):
        lines.append(f"  cannot run: {m['schedule_error']}")
    for i in m["instances"]:
        lines.append(f"  {i['id']}  {i['state']:<10} node {i['node_id']}  port "
                     f"{i['port'] or '-'}  {i.get('reason') or ''}".rstrip())
    return "\n".join(lines)


def _backend_label(model: dict[str, Any]) -> str:
    label = model["backend"] + (f"=={model['backend_version']}" if model.get("backend_version") else "")
    return label + (f" ({model['image']})" if model.get("image") else "")


def cmd_rm(args: argparse.Namespace) -> int:
    client = client_for(args)
    try:
        result = client.delete(model_path(args.name))
    except ApiError as exc:
        if exc.status == 404 and args.ignore_missing:
            result = {"deleted": None, "instances_removed": 0}
        else:
            raise
    print_result(args, result, lambda r: f"removed {r['deleted']} ({r['instances_removed']} "
                                   f"instance(s) stopped)" if r["deleted"] else
                 f"no model named {args.name!r}; nothing to remove")
    return Exit.OK


def cmd_scale(args: argparse.Namespace) -> int:
    client = client_for(args)
    model = client.patch(model_path(args.name), {"replicas": args.replicas})
    if args.wait:
        model = wait_running(client, args.name, args.timeout)
        print_result(args, model, describe_ready)
        return Exit.OK
    print_result(args, model, lambda m: f"{m['name']}: {m['replicas']} replica(s) wanted")
    return Exit.OK


def cmd_instances(args: argparse.Namespace) -> int:
    client = client_for(args)
    instances = client.get("/api/instances")["data"]
    if args.model:
        instances = [i for i in instances if i["model"] == args.model]
    # Replicas that have no instance yet say why as one "pending" row per model.
    pending = [m for m in client.get("/api/models")["data"]
               if m.get("schedule_error") and args.model in (None, m["name"])]
    rows = [[i["id"], i["model"], i["node_id"], status_cell(i["state"]),
             _device_cell(i["allocation"]), i["port"] or "-", _why(i)] for i in instances]
    rows += [["-", m["name"], "-", status_cell("pending"), "-", "-",
              m["schedule_error"]] for m in pending]
    print_result(args, instances, lambda items: table(
        ["ID", "MODEL", "NODE", "STATE", "DEVICE", "PORT", "WHY"], rows))
    return Exit.OK


def _device_cell(allocation: dict[str, Any]) -> str:
    where = allocation["device"]
    if where == "gpu":
        where = "gpu " + ",".join(map(str, allocation["gpu_indices"]))
    workers = len(allocation.get("workers") or ())      # a model spread over nodes
    return where + (f" +{workers} node(s)" if workers else "")


def _why(instance: dict[str, Any]) -> str:
    """An error's reason first; an install's step; else where the scheduler put it and why."""
    if instance["state"] == "error" and instance.get("reason"):
        return instance["reason"]
    if instance["state"] == "installing" and instance.get("progress"):
        return f"installing: {instance['progress'].get('step', '')}"
    download = instance.get("download")
    if instance["state"] == "downloading" and download:
        rate = download.get("rate_bytes_per_s") or 0
        eta = download.get("eta_s")
        return (f"downloading {download.get('percent') or 0:.0f}% of "
                f"{gib(download.get('bytes_total') or 0)}"
                + (f", {rate / (1 << 20):.1f} MiB/s" if rate else "")
                + (f", ETA {eta:.0f} s" if eta is not None else ""))
    return instance.get("placement_reason") or instance.get("reason") or ""


def register(sub: Any) -> None:
    deploy = add_client_command(
        sub, "deploy", cmd_deploy, "deploy a model from a path, a repo or a spec file",
        description="Deploy a model from a local GGUF file or folder, a Hugging Face repo, or "
                    "a YAML spec file (-f; applying the same file again changes nothing).")
    deploy.add_argument("source", metavar="PATH_OR_REPO", nargs="?",
                        help="a local GGUF file/dir, or a Hugging Face repo (owner/name[:file])")
    deploy.add_argument("-f", "--file", metavar="SPEC.yaml",
                        help="deploy the models a YAML spec file describes (idempotent; "
                             "`-` reads stdin); see the README for its fields")
    deploy.add_argument("--name", help="the name clients send as `model` (default: the file "
                        "or repo name); ASCII letters, digits and . _ : / -, at most 128")
    deploy.add_argument("--backend", metavar="NAME[==VERSION]",
                        help="engine to use, optionally a version installed on demand "
                        "(e.g. vllm==0.25.1; default: chosen by model format and kind; "
                        "`gpumesh backends` lists them)")
    # Checked by the daemon (the CLI stays light: no model-file code imported to start).
    deploy.add_argument("--kind", help="llm, vlm, embedding, rerank, image, stt or tts "
                        "(default: detected from the model's files, else llm)")
    deploy.add_argument("--image", help="run the engine in this container image")
    deploy.add_argument("--replicas", type=int, help="instances to run (default 1)")
    deploy.add_argument("--context-length", type=int, metavar="TOKENS",
                        help="context window (default: the model's, at most 4096; more than "
                             "the model was trained for is refused)")
    deploy.add_argument("--arg", action="append", metavar="ENGINE_ARG",
                        help="extra engine argument (repeatable), e.g. --arg=--embeddings")
    deploy.add_argument("--replace", action="store_true",
                        help="with -f: a model whose source, backend, context or args differ "
                             "from the file is removed and deployed again (else refused)")
    _wait_flags(deploy)
    placement.add_flags(deploy)

    models = add_client_command(sub, "models", cmd_models, "list models", aliases=("ls",))
    cache.register_under(models)                 # gpumesh models cache ls|rm
    show = add_client_command(sub, "show", cmd_show, "one model in detail: source, "
                              "memory, instances and why any is not running")
    completes(show.add_argument("name", metavar="NAME", help="the model's name"), "models")
    instances = add_client_command(sub, "instances", cmd_instances,
                                   "list instances (replicas): where each runs, its state "
                                   "and why")
    instances.add_argument("--model", metavar="NAME", help="only this model's instances")

    scale = add_client_command(sub, "scale", cmd_scale, "change a model's replica count")
    completes(scale.add_argument("name", metavar="NAME", help="the model's name"), "models")
    scale.add_argument("replicas", metavar="REPLICAS", type=int,
                       help="instances wanted (0 stops every instance but keeps the model)")
    _wait_flags(scale)

    rm = add_client_command(sub, "rm", cmd_rm, "remove a model and stop its instances")
    completes(rm.add_argument("name", metavar="NAME", help="the model's name"), "models")
    rm.add_argument("--ignore-missing", action="store_true",
                    help="exit 0 when there is no such model (for scripts)")


def _wait_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--wait", action="store_true",
                        help="return when running; else exit non-zero with the reason "
                             "(7 not schedulable, 6 timed out, 1 an instance failed)")
    parser.add_argument("--timeout", type=float, default=600.0, metavar="SECONDS",
                        help="how long --wait waits (default 600)")
