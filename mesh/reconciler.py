"""The leader's loop: keep each model's instances at the count it wants now.

Runs on every node but acts only while this node is the Raft leader, so exactly one node
schedules at a time and a new leader picks up where the old one stopped (the state is the
only memory). Each pass re-reads the state and makes at most one change per model, so every
decision sees the previous one's effect (the memory it booked).

`decide` is the pure part (state in, commands out), shared with the benchmark; the
reconciler only submits what it returns. A `ClusterIndex` follows the state incrementally,
so a decision costs an identity check per record plus an indexed lookup, not a rescan.
"""

from __future__ import annotations

import logging
import secrets
import time
from typing import Any, Callable, Mapping

from .commands.nodes import nodes_used
from .scheduler import ClusterIndex, Placement, Scheduler
from .scheduler.demand import EVICT_IDLE_S, plan_eviction, wanted_replicas
from .replicated import StateView
from .state import ClusterStore, CommandRejected, StateUnavailable

__all__ = ["ReplicaReconciler", "decide"]

log = logging.getLogger("gpumesh.scheduler")

_RESYNC_S = 2.0
# A drained node's instance goes only once its replacements have run this long: every
# gateway must have applied "running" before the old one disappears, or a node lagging by
# a moment would still route to the old one only, and fail (seen under load).
HANDOVER_S = 3.0


def decide(scheduler: Scheduler, model: Mapping[str, Any], index: ClusterIndex,
           models: Mapping[str, Mapping[str, Any]], now: float,
           new_id: Callable[[str], str], evict_idle_s: float = EVICT_IDLE_S) -> list[dict[str, Any]]:
    """The commands that move `model` one step towards the replicas it wants now.

    `index` must reflect the state `models` belongs to. Placing one more instance, removing
    one, evicting idle instances of other on-demand models to make room, or recording
    (clearing) why the model cannot be placed.
    """
    name = model["name"]
    # Instances on a draining node are leaving: each is replaced elsewhere first and goes
    # once enough replicas run without it (commands/nodes.py), so a drain leaves no gap.
    leaving = sorted(i for i in index.instances_by_model.get(name, ())
                     if _on_draining_node(index, i))
    ids = [i for i in index.instances_by_model.get(name, ()) if i not in leaving]
    wanted = wanted_replicas(model, now)
    if len(ids) < wanted:
        # One node without evicting, then one node by evicting idle instances, and only then
        # one replica split over several nodes (slower to serve than either).
        outcome = scheduler.place_in(model, index, multi_node=False)
        if isinstance(outcome, Placement):
            return _create(scheduler, model, outcome, new_id, now)
        single_node = lambda m, i: scheduler.place_in(m, i, multi_node=False)  # noqa: E731
        eviction = plan_eviction(model, index, models, now, single_node, evict_idle_s)
        if eviction is None:
            outcome = scheduler.place_in(model, index)
            if isinstance(outcome, Placement):
                return _create(scheduler, model, outcome, new_id, now)
        else:
            log.info("evicting %s (idle: %s) to make room for %s", ", ".join(eviction.instance_ids),
                     ", ".join(eviction.models), name)
            return ([{"op": "update_model", "name": m, "changes": {"evicted_at": now}}
                     for m in eviction.models]
                    + [{"op": "delete_instance", "id": i} for i in eviction.instance_ids])
        return _set_error(model, outcome.reason)
    if len(ids) > wanted:
        # Scale down the least useful first: not running, then the newest.
        victim = min((index.instances[i] for i in ids),
                     key=lambda i: (i.get("state") == "running", -i.get("created", 0.0), i["id"]))
        return [{"op": "delete_instance", "id": victim["id"]}]
    if leaving and sum(_serving_for(index.instances[i], now) >= HANDOVER_S
                       for i in ids) >= wanted:
        return [{"op": "delete_instance", "id": leaving[0], "if_running_elsewhere": wanted}]
    return _set_error(model, None)


def _serving_for(instance: Mapping[str, Any], now: float) -> float:
    """Seconds it has been running (by its last update), 0 if it is not running."""
    if instance.get("state") != "running":
        return 0.0
    return now - float(instance.get("updated") or 0.0)


def _on_draining_node(index: ClusterIndex, instance_id: str) -> bool:
    """Run by, or spread over (an RPC worker), a draining node."""
    return any((node := index.nodes.get(n)) is not None and node.status == "draining"
               for n in nodes_used(index.instances[instance_id]))


def _create(scheduler: Scheduler, model: Mapping[str, Any], placement: Placement,
            new_id: Callable[[str], str], now: float) -> list[dict[str, Any]]:
    # The state machine re-checks capacity (commands/capacity.py) with our reserves.
    limits = {"reserved_memory_bytes": scheduler.reserved_memory_bytes,
              "gpu_memory_fraction": scheduler.gpu_memory_fraction}
    return [{"op": "create_instance", "instance": _instance(model, placement, new_id, now),
             "limits": limits}, *_set_error(model, None)]


def _set_error(model: Mapping[str, Any], reason: str | None) -> list[dict[str, Any]]:
    if model.get("schedule_error") == reason:
        return []
    return [{"op": "update_model", "name": model["name"], "changes": {"schedule_error": reason}}]


def _instance(model: Mapping[str, Any], placement: Placement, new_id: Callable[[str], str],
              now: float) -> dict[str, Any]:
    return {
        "id": new_id(model["name"]),
        "model": model["name"],
        "node_id": placement.node_id,
        "state": "scheduled",
        "allocation": placement.allocation(),
        "placement_reason": placement.reason,
        "port": None,
        "pid": None,
        "reason": None,
        "restarts": 0,
        "created": now,
        "updated": now,
    }


def new_instance_id(model_name: str) -> str:
    return f"{_slug(model_name)}-{secrets.token_hex(3)}"


class ReplicaReconciler:
    def __init__(self, store: ClusterStore, scheduler: Scheduler, *,
                 clock: Callable[[], float] = time.time, evict_idle_s: float = EVICT_IDLE_S) -> None:
        self._store = store
        self._scheduler = scheduler
        self._index = scheduler.new_index()
        self._clock = clock
        self._evict_idle_s = evict_idle_s

    async def run(self) -> None:
        version = -1
        while True:
            view = await self._store.wait_changed(version, timeout=_RESYNC_S)
            version = view.version
            if self._store.status.is_leader:
                await self.reconcile_once(view)

    async def reconcile_once(self, view: StateView) -> None:
        for name in sorted(view.models):
            # Re-read for every model: the previous one's placement (applied here before
            # submit returned) must count against the memory this one can take.
            view = self._store.view
            if (model := view.models.get(name)) is None:
                continue
            self._index.sync(view.nodes, view.instances)
            commands = decide(self._scheduler, model, self._index, view.models, self._clock(),
                              new_instance_id, self._evict_idle_s)
            try:
                for command in commands:
                    if command["op"] == "create_instance":
                        # apply_command re-checks capacity with the scheduler's reserves.
                        command = {**command, "limits": {
                            "reserved_memory_bytes": self._scheduler.reserved_memory_bytes,
                            "gpu_memory_fraction": self._scheduler.gpu_memory_fraction}}
                    await self._store.submit(command)
            except CommandRejected as exc:   # raced with a delete or a node change: next pass
                log.debug("reconcile %s: %s", name, exc)
            except StateUnavailable as exc:
                log.warning("cannot reconcile %s now: %s", name, exc)
                return
            for command in commands:
                if command["op"] == "update_model" and command["changes"].get("schedule_error"):
                    log.warning("cannot schedule %s: %s", name, command["changes"]["schedule_error"])


def _slug(name: str) -> str:
    """Instance ids appear in file names and URLs: keep them plain."""
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name)[:48]
