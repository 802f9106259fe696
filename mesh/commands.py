"""Replicated commands: plain-data records and the deterministic function that applies them.

Every change to the cluster state is one command, a msgpack-able dict `{"op": ..., ...}`.
`apply_command` runs on every node in the same order (Raft), so it must be deterministic:
no clocks, no randomness, no I/O. Timestamps and ids are chosen by whoever *submits* the
command and travel inside it.

The state is a dict of collections (`nodes`, `models`, `instances`, `api_keys`), each a dict
from id to record. Records are never mutated in place: a command builds new records and a
new collection dict, and the caller swaps the top-level reference. Readers on other threads
therefore always see a consistent, immutable snapshot without taking a lock.

Conditions (compare-and-set) live here too, so that a retried or raced command is harmless:
creating a model that exists fails, updating an instance that was deleted fails, an agent can
only update instances assigned to its own node.
"""

from __future__ import annotations

from typing import Any, Callable

__all__ = ["COLLECTIONS", "INSTANCE_STATES", "CommandError", "apply_command", "empty_state"]

COLLECTIONS = ("nodes", "models", "instances", "api_keys")

# The life of an instance. `scheduled` is written by the leader, the rest by the node agent
# that owns the instance (except that deleting a model removes its instances outright).
INSTANCE_STATES = ("scheduled", "downloading", "starting", "running", "error")

State = dict[str, dict[str, dict[str, Any]]]
Result = dict[str, Any]


class CommandError(Exception):
    """A command that cannot apply: the state is left unchanged, the submitter is told why."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def empty_state() -> State:
    return {name: {} for name in COLLECTIONS}


def apply_command(state: State, command: dict[str, Any]) -> tuple[State, Result]:
    """Apply one command; return the new state (old one untouched) and a result for the submitter."""
    op = command.get("op", "")
    handler = _HANDLERS.get(op) if isinstance(op, str) else None   # a list op is unhashable
    if handler is None:
        return state, {"error": f"unknown command {command.get('op')!r}", "code": "bad_command"}
    try:
        changes, result = handler(state, command)
    except CommandError as exc:
        return state, {"error": str(exc), "code": exc.code}
    except (KeyError, TypeError, ValueError) as exc:
        # A malformed command must not stop the state machine on every node.
        return state, {"error": f"malformed {command.get('op')} command: {exc!r}",
                       "code": "bad_command"}
    new_state = dict(state)
    new_state.update(changes)
    return new_state, result


# --- handlers: each returns ({collection: new collection dict}, result) ---------------------

def _upsert_node(state: State, cmd: dict[str, Any]) -> tuple[dict, Result]:
    node = dict(cmd["node"])
    nodes = dict(state["nodes"])
    previous = nodes.get(node["id"], {})
    nodes[node["id"]] = {**previous, **node}
    return {"nodes": nodes}, {"ok": True}


def _create_model(state: State, cmd: dict[str, Any]) -> tuple[dict, Result]:
    model = dict(cmd["model"])
    if model["name"] in state["models"]:
        raise CommandError("model_exists", f"a model named {model['name']!r} already exists")
    models = dict(state["models"])
    models[model["name"]] = model
    return {"models": models}, {"ok": True, "model": model}


def _update_model(state: State, cmd: dict[str, Any]) -> tuple[dict, Result]:
    name = cmd["name"]
    if name not in state["models"]:
        raise CommandError("model_not_found", f"no model named {name!r}")
    _refuse_identity_changes(cmd["changes"], ("name",))
    models = dict(state["models"])
    models[name] = {**models[name], **cmd["changes"]}
    return {"models": models}, {"ok": True, "model": models[name]}


def _delete_model(state: State, cmd: dict[str, Any]) -> tuple[dict, Result]:
    name = cmd["name"]
    if name not in state["models"]:
        raise CommandError("model_not_found", f"no model named {name!r}")
    models = {k: v for k, v in state["models"].items() if k != name}
    instances = {k: v for k, v in state["instances"].items() if v["model"] != name}
    removed = len(state["instances"]) - len(instances)
    return {"models": models, "instances": instances}, {"ok": True, "instances_removed": removed}


def _create_instance(state: State, cmd: dict[str, Any]) -> tuple[dict, Result]:
    instance = dict(cmd["instance"])
    if instance["model"] not in state["models"]:
        raise CommandError("model_not_found", f"no model named {instance['model']!r}")
    if instance["id"] in state["instances"]:
        raise CommandError("instance_exists", f"instance {instance['id']!r} exists")
    if instance["node_id"] not in state["nodes"]:
        raise CommandError("node_not_found", f"no node {instance['node_id']!r}")
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
    _refuse_identity_changes(changes, ("id", "model", "node_id"))
    if "state" in changes and changes["state"] not in INSTANCE_STATES:
        raise CommandError("bad_state", f"unknown instance state {changes['state']!r}")
    instances = dict(state["instances"])
    instances[cmd["id"]] = {**current, **changes}
    return {"instances": instances}, {"ok": True, "instance": instances[cmd["id"]]}


def _delete_instance(state: State, cmd: dict[str, Any]) -> tuple[dict, Result]:
    if cmd["id"] not in state["instances"]:
        raise CommandError("instance_not_found", f"no instance {cmd['id']!r}")
    instances = {k: v for k, v in state["instances"].items() if k != cmd["id"]}
    return {"instances": instances}, {"ok": True}


def _create_api_key(state: State, cmd: dict[str, Any]) -> tuple[dict, Result]:
    # Keys are stored under their SHA-256 hash so the gateway authenticates with one lookup.
    key = dict(cmd["key"])
    keys = state["api_keys"]
    if key["hash"] in keys or any(k["id"] == key["id"] for k in keys.values()):
        raise CommandError("key_exists", f"API key {key['id']!r} exists")
    # The first-admin bootstrap is conditional: if any admin key exists, a second node (or a
    # restart racing with itself) must not mint another one.
    if cmd.get("only_if_no_admin") and any(k["role"] == "admin" for k in keys.values()):
        raise CommandError("admin_exists", "an admin API key already exists")
    new_keys = dict(keys)
    new_keys[key["hash"]] = key
    return {"api_keys": new_keys}, {"ok": True}


def _delete_api_key(state: State, cmd: dict[str, Any]) -> tuple[dict, Result]:
    keys = {h: k for h, k in state["api_keys"].items() if k["id"] != cmd["id"]}
    if len(keys) == len(state["api_keys"]):
        raise CommandError("key_not_found", f"no API key {cmd['id']!r}")
    return {"api_keys": keys}, {"ok": True}


def _refuse_identity_changes(changes: dict[str, Any], identity: tuple[str, ...]) -> None:
    if touched := sorted(set(changes) & set(identity)):
        raise CommandError("immutable_field", f"{', '.join(touched)} cannot be changed")


_HANDLERS: dict[str, Callable[[State, dict[str, Any]], tuple[dict, Result]]] = {
    "upsert_node": _upsert_node,
    "create_model": _create_model,
    "update_model": _update_model,
    "delete_model": _delete_model,
    "create_instance": _create_instance,
    "update_instance": _update_instance,
    "delete_instance": _delete_instance,
    "create_api_key": _create_api_key,
    "delete_api_key": _delete_api_key,
}
