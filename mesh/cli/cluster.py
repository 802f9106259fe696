"""Cluster commands: `nodes`, `status`, `join-token`, `node drain|rm` (`backends` lives in
engines.py)."""

from __future__ import annotations

import argparse
import time
from typing import Any

from urllib.parse import quote

from ..client import model_path
from ..commands.nodes import nodes_used
from .output import (CliError, Exit, add_client_command, add_group, client_for, completes, gib,
                     print_result, status_cell, table)

__all__ = ["register"]


NO_QUORUM_NOTE = ("no quorum: management writes (deploy, scale, rm, keys, joins) are refused "
                  "until a majority of members is back; inference on running instances and "
                  "reads keep working on every node")


def cmd_nodes(args: argparse.Namespace) -> int:
    client = client_for(args)
    nodes = client.get("/api/nodes")["data"]
    print_result(args, nodes, lambda ns: table(
        ["ID", "NAME", "STATE", "ROLE", "CPUS", "RAM", "GPUS", "API"],
        [[n["id"], n["name"], status_cell(n["state"]), n["role"], n["inventory"]["cpu_cores"],
          gib(n["inventory"]["memory_total_bytes"]), len(n["inventory"]["gpus"]),
          n["api_url"]] for n in ns]) + _quorum_note(client))
    return Exit.OK


def _quorum_note(client: Any) -> str:
    return "" if client.get("/api/status")["quorum"] else "\n" + NO_QUORUM_NOTE


def cmd_status(args: argparse.Namespace) -> int:
    status = client_for(args).get("/api/status")
    print_result(args, status, _describe_status)
    return Exit.OK


def _describe_status(s: dict[str, Any]) -> str:
    leader = s["leader"]
    who = (f"{leader['node_id'] or '?'} ({leader['api_url'] or leader['raft_address']})"
           if leader else "none (election in progress, or no quorum)")
    lines = [f"gpumesh {s['version']} · node {s['node_id']} · cluster {s['cluster_id']} · "
             f"up {s['uptime_s']:.0f} s",
             f"leader {who} · term {s['term']} · quorum {'yes' if s['quorum'] else 'NO'}",
             f"{s['counts']['nodes']} node(s), {s['counts']['models']} model(s), "
             f"{s['counts']['instances']} instance(s)",
             table(["MEMBER", "NODE", "ROLE", "STATE", "API"],
                   [[m["raft_address"], m["name"] or m["node_id"] or "-", m["role"],
                     status_cell(m["state"]), m["api_url"] or "-"] for m in s["members"]])]
    if not s["quorum"]:
        lines.append(NO_QUORUM_NOTE)
    return "\n".join(lines)


def cmd_join_token(args: argparse.Namespace) -> int:
    reply = client_for(args).post("/api/join-tokens", {"ttl_s": args.ttl})
    print_result(args, reply, lambda r: r["token"])
    return Exit.OK


def cmd_node_drain(args: argparse.Namespace) -> int:
    client = client_for(args)
    reply = client.post(f"/api/nodes/{quote(args.name, safe='')}/drain", {"undo": args.undo})
    started = (f"node {reply['name']} is ready again" if args.undo else
               f"node {reply['name']} is draining: {len(reply['instances_moving'])} "
               f"instance(s) moving to other nodes, each stopped once its replacement runs "
               f"there; nothing new is placed there (`gpumesh node drain --undo "
               f"{reply['name']}` ends it)")
    if not (args.wait and not args.undo and reply["instances_moving"]):
        print_result(args, reply, lambda r: started)
        return Exit.OK
    if not args.json:
        print(started, flush=True)
    _wait_drained(client, reply, args.timeout)
    print_result(args, {**reply, "drained": True},
                 lambda r: f"node {r['name']} is drained: no instance left on it")
    return Exit.OK


def _wait_drained(client: Any, reply: dict[str, Any], timeout: float) -> None:
    """Until no instance is left on the node; CliError naming what holds it up if not."""
    deadline = time.monotonic() + timeout
    while True:
        # Its own instances, and those spread over it as an RPC worker.
        left = [i for i in client.get("/api/instances")["data"]
                if reply["node"] in nodes_used(i)]
        if not left:
            return
        if time.monotonic() > deadline:
            models = sorted({i["model"] for i in left})
            reasons = [f"{m}: {e}" for m in models
                       if (e := client.get(model_path(m)).get("schedule_error"))]
            raise CliError(
                f"node {reply['name']} still holds {len(left)} instance(s) after "
                f"{timeout:g} s ({', '.join(models)}); they stay until a replacement runs "
                f"elsewhere" + (f" — {'; '.join(reasons)}" if reasons else ""),
                Exit.TIMED_OUT, data={"instances": left}, code="timed_out")
        time.sleep(0.5)


def cmd_node_rm(args: argparse.Namespace) -> int:
    reply = client_for(args, timeout=60).delete(f"/api/nodes/{quote(args.name, safe='')}")
    print_result(args, reply, lambda r: (
        f"node {r['name']} ({r['removed']}) left the cluster; "
        f"{len(r['instances_moved'])} instance(s) moved. Before it joins again, wipe its data "
        f"dir (its Raft journal still holds the old membership), then `gpumesh up --token` "
        f"with a fresh token"))
    return Exit.OK


def register(sub: Any) -> None:
    add_client_command(sub, "nodes", cmd_nodes, "list nodes")
    add_client_command(sub, "status", cmd_status, "cluster status as this node sees it")
    token = add_client_command(sub, "join-token", cmd_join_token,
                               "print a token that lets a new node join this cluster")
    token.add_argument("--ttl", type=int, default=24 * 3600,
                       help="seconds the token stays valid (default 86400)")
    node_sub = add_group(sub, "node", "drain or remove a node",
                         "drain (move its instances away) or rm (remove it)")
    drain = add_client_command(node_sub, "drain", cmd_node_drain,
                               "move a node's instances away and place nothing new there")
    completes(drain.add_argument("name", metavar="NAME", help="the node's name or id"), "nodes")
    drain.add_argument("--undo", action="store_true", help="end the drain: the node is ready")
    drain.add_argument("--wait", action="store_true",
                       help="return once no instance is left on the node")
    drain.add_argument("--timeout", type=float, default=600.0, metavar="SECONDS",
                       help="how long --wait waits (default 600)")
    rm = add_client_command(node_sub, "rm", cmd_node_rm,
                            "take a node out of the cluster (its instances move elsewhere)")
    completes(rm.add_argument("name", metavar="NAME", help="the node's name or id"), "nodes")
