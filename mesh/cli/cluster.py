"""Cluster commands: `nodes`, `status`, `backends`."""

from __future__ import annotations

import argparse
from typing import Any

from .output import Exit, add_client_command, client_for, gib, print_result, status_cell, table

__all__ = ["register"]


def cmd_nodes(args: argparse.Namespace) -> int:
    nodes = client_for(args).get("/api/nodes")["data"]
    print_result(args, nodes, lambda ns: table(
        ["ID", "NAME", "STATUS", "CPUS", "RAM", "GPUS", "API"],
        [[n["id"], n["name"], status_cell(n["status"]), n["inventory"]["cpu_cores"],
          gib(n["inventory"]["memory_total_bytes"]), len(n["inventory"]["gpus"]),
          n["api_url"]] for n in ns]))
    return Exit.OK


def cmd_status(args: argparse.Namespace) -> int:
    status = client_for(args).get("/api/status")
    raft = status["raft"]
    print_result(args, status, lambda s: (
        f"gpumesh {s['version']} · node {s['node_id']} · up {s['uptime_s']:.0f} s\n"
        f"raft: leader {raft['leader'] or 'none'} · term {raft['term']} · "
        f"{len(raft['members'])} member(s) · quorum {'yes' if raft['has_quorum'] else 'NO'}\n"
        f"{s['counts']['nodes']} node(s), {s['counts']['models']} model(s), "
        f"{s['counts']['instances']} instance(s)"))
    return Exit.OK


def cmd_backends(args: argparse.Namespace) -> int:
    backends = client_for(args).get("/api/backends")["data"]
    print_result(args, backends, lambda bs: table(
        ["NAME", "VERSION", "FORMATS", "DEVICES", "AVAILABLE"],
        [[b["name"], b["version"] or "-", ",".join(b["model_formats"]),
          ",".join((["cpu"] if b["runs_on_cpu"] else []) + b["gpu_vendors"]),
          status_cell("yes" if b["available"] else f"no: {b['problem']}")] for b in bs]))
    return Exit.OK


def register(sub: Any) -> None:
    add_client_command(sub, "nodes", cmd_nodes, "list nodes")
    add_client_command(sub, "status", cmd_status, "cluster status as this node sees it")
    add_client_command(sub, "backends", cmd_backends, "engines this node can run")
