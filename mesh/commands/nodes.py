"""Commands on the `nodes` collection: the records nodes keep of themselves, and what the
leader and the admin decide about them.

A record's `status` is its liveness: `ready` or `stopped` (written by the node itself) and
`unreachable` (written by the leader, which alone sees every node's acks). `draining` is the
admin's decision and outlives restarts. When the leader marks a node unreachable (or finds
a stopped one still holding instances) its instances leave it in the same command
(`evict`) — with those spread over it as an RPC worker — so the reconciler places them
elsewhere at once and no reader ever sees a node that is gone still holding instances.

A drained node is still there, so its instances are not dropped: they keep serving while
the reconciler starts a replacement for each on another node (instances on a draining node
do not count towards a model's replicas: `leaving`), and each is deleted only once enough
replicas run elsewhere (`delete_instance` with `if_running_elsewhere`). A model with one
replica never has a gap, and one with nowhere else to go stays where it is. An instance
spread over a draining node as an RPC worker is leaving in the same way.
"""

from __future__ import annotations

from typing import Any, Mapping

from .common import CommandError, Result, State

NODE_STATUSES = ("ready", "stopped", "unreachable")


def _upsert_node(state: State, cmd: dict[str, Any]) -> tuple[dict, Result]:
    node = dict(cmd["node"])
    nodes = dict(state["nodes"])
    previous = nodes.get(node["id"], {})
    nodes[node["id"]] = {**previous, **node}
    return {"nodes": nodes}, {"ok": True}


def _node_heartbeat(state: State, cmd: dict[str, Any]) -> tuple[dict, Result]:
    """A node's periodic refresh: free memory and load, a few bytes every few seconds.

    `resources.gpus` (each GPU's index and used bytes, from the node's telemetry) also
    refreshes the inventory's `memory_used_bytes`, which the scheduler reads: memory that a
    program gpumesh did not start takes (or frees) counts within a heartbeat, not only at the
    node's next registration."""
    current = _node(state, cmd["id"])
    resources = dict(cmd["resources"])
    updated = {**current, "resources": resources, "heartbeat_at": cmd["at"]}
    used = {g["index"]: g["memory_used_bytes"] for g in resources.get("gpus") or ()}
    inventory = current.get("inventory")
    if used and inventory and inventory.get("gpus"):
        updated["inventory"] = {**inventory, "gpus": [
            {**g, "memory_used_bytes": used[g["index"]]} if g["index"] in used else g
            for g in inventory["gpus"]]}
    nodes = dict(state["nodes"])
    nodes[cmd["id"]] = updated
    return {"nodes": nodes}, {"ok": True}


def _set_node_status(state: State, cmd: dict[str, Any]) -> tuple[dict, Result]:
    """The leader's verdict. `if_status` makes it compare-and-set: a verdict reached on an old
    view (or by a leader that was just deposed) does not undo a newer one."""
    current = _node(state, cmd["id"])
    status = cmd["status"]
    if status not in NODE_STATUSES:
        raise CommandError("bad_state", f"unknown node status {status!r}")
    if "if_status" in cmd and current.get("status") != cmd["if_status"]:
        raise CommandError("status_changed", f"node {cmd['id']} is {current.get('status')}, "
                           f"not {cmd['if_status']}")
    nodes = dict(state["nodes"])
    nodes[cmd["id"]] = {**current, "status": status, "status_reason": cmd.get("reason"),
                        "status_since": cmd["at"]}
    changes: dict[str, Any] = {"nodes": nodes}
    moved: list[str] = []
    if cmd.get("evict"):
        if status == "ready":
            raise CommandError("bad_command", "a ready node keeps its instances")
        changes["instances"], moved = _without_instances_on(state, cmd["id"])
    return changes, {"ok": True, "instances_removed": moved}


def _drain_node(state: State, cmd: dict[str, Any]) -> tuple[dict, Result]:
    current = _node(state, cmd["id"])
    nodes = dict(state["nodes"])
    nodes[cmd["id"]] = {**current, "draining": bool(cmd["draining"])}
    on_node = sorted(k for k, v in state["instances"].items() if uses_node(v, cmd["id"]))
    return {"nodes": nodes}, {"ok": True, "instances_leaving": on_node if cmd["draining"]
                              else []}


def leaving(state: State, instance: dict[str, Any]) -> bool:
    """On a draining node (as its head or an RPC worker): serving until replaced elsewhere,
    not counted as a replica."""
    return any((node := state["nodes"].get(n)) is not None and node.get("draining")
               for n in nodes_used(instance))


def _remove_node(state: State, cmd: dict[str, Any]) -> tuple[dict, Result]:
    _node(state, cmd["id"])
    nodes = {k: v for k, v in state["nodes"].items() if k != cmd["id"]}
    instances, moved = _without_instances_on(state, cmd["id"])
    return {"nodes": nodes, "instances": instances}, {"ok": True, "instances_removed": moved}


def _node(state: State, node_id: str) -> dict[str, Any]:
    node = state["nodes"].get(node_id)
    if node is None:
        raise CommandError("node_not_found", f"no node {node_id!r}")
    return node


def _without_instances_on(state: State, node_id: str) -> tuple[dict, list[str]]:
    """Instances that run on the node, or lend its devices (a model spread over nodes: its
    worker's share of the layers goes with the node, so the whole instance is re-planned)."""
    kept = {k: v for k, v in state["instances"].items() if not uses_node(v, node_id)}
    return kept, sorted(set(state["instances"]) - set(kept))


def nodes_used(instance: Mapping[str, Any]) -> list[str]:
    """The node an instance runs on, then the nodes that lend it devices as RPC workers."""
    workers = (instance.get("allocation") or {}).get("workers") or ()
    return [instance["node_id"], *(w["node_id"] for w in workers if w.get("node_id"))]


def uses_node(instance: Mapping[str, Any], node_id: str) -> bool:
    return node_id in nodes_used(instance)


HANDLERS = {
    "upsert_node": _upsert_node,
    "node_heartbeat": _node_heartbeat,
    "set_node_status": _set_node_status,
    "drain_node": _drain_node,
    "remove_node": _remove_node,
}
