"""State changes in words: one log line per change, from diffing two state views.

The daemon logs these as they replicate, so every node's log tells the cluster's story
(the same lines will feed /api/events and the TUI).
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from .replicated import StateView
from .state import ClusterStore, RaftStatus

__all__ = ["describe_changes", "log_state_changes"]

log = logging.getLogger("gpumesh.events")

Record = dict[str, Any]


def describe_changes(old: StateView, new: StateView) -> list[str]:
    lines: list[str] = []
    lines += _diff(old.nodes, new.nodes, "node",
                   lambda n: f"{n['name']} ({n['id']})",
                   lambda a, b: f"{a.get('status')} → {b.get('status')}"
                   if a.get("status") != b.get("status") else None)
    lines += _diff(old.models, new.models, "model",
                   lambda m: f"{m['name']} ({m['backend']}, {m['replicas']} replica(s))",
                   _model_change)
    lines += _diff(old.instances, new.instances, "instance",
                   lambda i: f"{i['id']} of {i['model']} on node {i['node_id']}",
                   _instance_change)
    return lines


def _model_change(old: dict[str, Any], new: dict[str, Any]) -> str | None:
    if old["replicas"] != new["replicas"]:
        return f"replicas {old['replicas']} → {new['replicas']}"
    if old.get("schedule_error") != new.get("schedule_error"):
        return f"unschedulable: {new['schedule_error']}" if new.get("schedule_error") \
            else "schedulable again"
    return None


def _instance_change(old: dict[str, Any], new: dict[str, Any]) -> str | None:
    if old["state"] == new["state"]:
        return None
    detail = ""
    if new["state"] == "running" and new.get("port"):
        detail = f" (port {new['port']})"
    elif new["state"] == "error" and new.get("reason"):
        detail = f": {new['reason']}"
    return f"{old['state']} → {new['state']}{detail}"


def _diff(old: dict[str, Record], new: dict[str, Record], kind: str,
          label: Callable[[Record], str],
          change: Callable[[Record, Record], str | None]) -> list[str]:
    lines = [f"{kind} {label(new[k])} added" for k in new.keys() - old.keys()]
    lines += [f"{kind} {label(old[k])} removed" for k in old.keys() - new.keys()]
    for key in old.keys() & new.keys():
        if old[key] is not new[key] and (what := change(old[key], new[key])):
            lines.append(f"{kind} {label(new[key])}: {what}")
    return sorted(lines)


async def log_state_changes(store: ClusterStore) -> None:
    """Log every replicated change and leadership change until cancelled."""
    view, status = store.view, store.status
    while True:
        new_view = await store.wait_changed(view.version)
        for line in describe_changes(view, new_view):
            log.info("%s", line)
        status = _log_leadership(status, store.status)
        view = new_view


def _log_leadership(old: RaftStatus, new: RaftStatus) -> RaftStatus:
    if old.leader != new.leader:
        who = "this node" if new.is_leader else (new.leader or "nobody")
        log.info("Raft leader is now %s (term %d)", who, new.term)
    return new
