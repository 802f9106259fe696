"""The leader's loop: keep each model's instances at its desired replica count.

Runs on every node but acts only while this node is the Raft leader, so exactly one node
schedules at a time and a new leader picks up where the old one stopped (the state is the
only memory). Each pass re-reads the state and makes at most one change per model, so every
decision sees the previous one's effect (the allocation it took).
"""

from __future__ import annotations

import logging
import secrets
import time
from typing import Any

from .scheduler import Placement, Scheduler
from .state import ClusterStore, CommandRejected, StateUnavailable, StateView

__all__ = ["ReplicaReconciler"]

log = logging.getLogger("gpumesh.scheduler")

_RESYNC_S = 2.0


class ReplicaReconciler:
    def __init__(self, store: ClusterStore, scheduler: Scheduler) -> None:
        self._store = store
        self._scheduler = scheduler

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
            try:
                await self._reconcile_model(view, model)
            except CommandRejected as exc:   # raced with a delete or a node change: next pass
                log.debug("reconcile %s: %s", name, exc)
            except StateUnavailable as exc:
                log.warning("cannot reconcile %s now: %s", name, exc)
                return

    async def _reconcile_model(self, view: StateView, model: dict[str, Any]) -> None:
        instances = view.instances_of(model["name"])
        missing = model["replicas"] - len(instances)
        if missing > 0:
            await self._add_instance(view, model)
        elif missing < 0:
            await self._remove_instance(instances)
        elif model.get("schedule_error"):
            await self._set_schedule_error(model, None)

    async def _add_instance(self, view: StateView, model: dict[str, Any]) -> None:
        outcome = self._scheduler.place(model, view.nodes.values(), view.instances.values())
        if not isinstance(outcome, Placement):
            await self._set_schedule_error(model, outcome.reason)
            return
        instance = {
            "id": f"{_slug(model['name'])}-{secrets.token_hex(3)}",
            "model": model["name"],
            "node_id": outcome.node_id,
            "state": "scheduled",
            "allocation": outcome.allocation(),
            "port": None,
            "pid": None,
            "reason": None,
            "restarts": 0,
            "created": time.time(),
            "updated": time.time(),
        }
        await self._store.submit({"op": "create_instance", "instance": instance})
        if model.get("schedule_error"):
            await self._set_schedule_error(model, None)

    async def _remove_instance(self, instances: list[dict[str, Any]]) -> None:
        # Scale down the least useful first: not running, then the newest.
        victim = min(instances, key=lambda i: (i["state"] == "running", -i["created"]))
        await self._store.submit({"op": "delete_instance", "id": victim["id"]})

    async def _set_schedule_error(self, model: dict[str, Any], reason: str | None) -> None:
        if model.get("schedule_error") == reason:
            return
        if reason:
            log.warning("cannot schedule %s: %s", model["name"], reason)
        await self._store.submit({"op": "update_model", "name": model["name"],
                                  "changes": {"schedule_error": reason}})


def _slug(name: str) -> str:
    """Instance ids appear in file names and URLs: keep them plain."""
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name)[:48]
