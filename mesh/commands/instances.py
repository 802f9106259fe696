"""Commands on the `instances` collection.

The life of an instance: `scheduled` is written by the leader, the rest by the node agent
that owns the instance (except that deleting a model removes its instances outright).
`restart_instance` (any node, for the API) only bumps `restart_generation`; the owner's
agent does the restarting.
"""

from __future__ import annotations

from typing import Any

from .capacity import check_fits
from .common import CommandError, Result, State, refuse_identity_changes
from .nodes import leaving

INSTANCE_STATES = ("scheduled", "downloading", "installing", "starting", "running", "error")


def _create_instance(state: State, cmd: dict[str, Any]) -> tuple[dict, Result]:
    instance = dict(cmd["instance"])
    if instance["model"] not in state["models"]:
        raise CommandError("model_not_found", f"no model named {instance['model']!r}")
    if instance["id"] in state["instances"]:
        raise CommandError("instance_exists", f"instance {instance['id']!r} exists")
    node = state["nodes"].get(instance["node_id"])
    if node is None:
        raise CommandError("node_not_found", f"no node {instance['node_id']!r}")
    # A leader deciding on an old view (or one just deposed) must not place an instance on
    # a node that is gone or being emptied.
    if node.get("status") in ("unreachable", "stopped") or node.get("draining"):
        raise CommandError("node_unavailable", f"node {instance['node_id']!r} is "
                           f"{'draining' if node.get('draining') else node['status']}")
    # Invariants, so two leaders (or two passes) deciding from the same view cannot both win.
    # Instances on a draining node are leaving and do not count: their replacements are
    # the one surge a drain allows (nodes.py).
    model = state["models"][instance["model"]]
    count = sum(1 for i in state["instances"].values()
                if i["model"] == instance["model"] and not leaving(state, i))
    if count >= model["replicas"]:
        raise CommandError("replicas_reached", f"model {instance['model']!r} already has "
                           f"{count} of {model['replicas']} instance(s)")
    check_fits(state["nodes"], instance, state["instances"].values(), cmd.get("limits"))
    instances = dict(state["instances"])
    instances[instance["id"]] = instance
    return {"instances": instances}, {"ok": True, "instance": instance}



def _update_instance(state: State, cmd: dict[str, Any]) -> tuple[dict, Result]:
    current = state["instances"].get(cmd["id"])
    if current is None:
        raise CommandError("instance_not_found", f"no instance {cmd['id']!r}")
    expected_node = cmd.get("node_id")
    if expected_node is not None and current["node_id"] != expected_node:
        raise CommandError("wrong_node", f"instance {cmd['id']!r} belongs to another node")
    changes = cmd["changes"]
    # Moving an instance is delete + create (by the leader), never an update: otherwise an
    # agent could take over another node's instance past the wrong_node condition above.
    refuse_identity_changes(changes, ("id", "model", "node_id"))
    if "state" in changes and changes["state"] not in INSTANCE_STATES:
        raise CommandError("bad_state", f"unknown instance state {changes['state']!r}")
    instances = dict(state["instances"])
    instances[cmd["id"]] = {**current, **changes}
    return {"instances": instances}, {"ok": True, "instance": instances[cmd["id"]]}



def _delete_instance(state: State, cmd: dict[str, Any]) -> tuple[dict, Result]:
    current = state["instances"].get(cmd["id"])
    if current is None:
        raise CommandError("instance_not_found", f"no instance {cmd['id']!r}")
    if "if_running_elsewhere" in cmd:
        # A drained node's instance goes only once its replacements run: decided on this
        # state, not on the view the leader had (a replacement may have failed since).
        running = sum(1 for i in state["instances"].values()
                      if i["model"] == current["model"] and i["state"] == "running"
                      and not leaving(state, i))
        if running < int(cmd["if_running_elsewhere"]):
            raise CommandError("not_replaced", f"instance {cmd['id']!r} stays until "
                               f"{cmd['if_running_elsewhere']} replica(s) of "
                               f"{current['model']!r} run elsewhere ({running} do)")
    instances = {k: v for k, v in state["instances"].items() if k != cmd["id"]}
    return {"instances": instances}, {"ok": True}



def _restart_instance(state: State, cmd: dict[str, Any]) -> tuple[dict, Result]:
    """Ask the owning node to restart an instance's engine. Any node may submit it: the
    owner's agent sees `restart_generation` move past the one its supervisor started with
    and restarts the engine (no node-to-node call, so it works from anywhere and reaches a
    node that is briefly away as soon as it catches up)."""
    current = state["instances"].get(cmd["id"])
    if current is None:
        raise CommandError("instance_not_found", f"no instance {cmd['id']!r}")
    generation = int(current.get("restart_generation") or 0) + 1
    instances = dict(state["instances"])
    instances[cmd["id"]] = {**current, "restart_generation": generation,
                            "restart_requested": cmd.get("at")}
    return {"instances": instances}, {"ok": True, "instance": instances[cmd["id"]]}


def _set_rpc_endpoint(state: State, cmd: dict[str, Any]) -> tuple[dict, Result]:
    """A worker node says where its llama.cpp rpc-server for an instance listens ("host:port"),
    or that it stopped (None). Only a node the instance's allocation names as a worker may,
    and each node writes its own entry, so workers never overwrite one another."""
    current = state["instances"].get(cmd["id"])
    if current is None:
        raise CommandError("instance_not_found", f"no instance {cmd['id']!r}")
    workers = [w["node_id"] for w in (current.get("allocation") or {}).get("workers") or []]
    if cmd["node_id"] not in workers:
        raise CommandError("not_a_worker", f"node {cmd['node_id']!r} is not a worker of "
                           f"instance {cmd['id']!r}")
    endpoints = dict(current.get("rpc_endpoints") or {})
    if cmd.get("endpoint"):
        endpoints[cmd["node_id"]] = str(cmd["endpoint"])
    else:
        endpoints.pop(cmd["node_id"], None)
    instances = dict(state["instances"])
    instances[cmd["id"]] = {**current, "rpc_endpoints": endpoints}
    return {"instances": instances}, {"ok": True, "rpc_endpoints": endpoints}


HANDLERS = {
    "create_instance": _create_instance,
    "update_instance": _update_instance,
    "delete_instance": _delete_instance,
    "restart_instance": _restart_instance,
    "set_rpc_endpoint": _set_rpc_endpoint,
}
