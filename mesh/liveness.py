"""The leader's liveness loop: which nodes are alive, and moving instances off those that
are not.

Runs on every node and acts only on the leader, which is the one node that hears from
every other one. A node shows it is alive by what it already sends:

* where the store reports it, when the leader last heard the node's Raft answers
  (`RaftStatus.peers[…].last_heard`), refreshed several times a second by Raft's own
  heartbeats: no write needed;
* its node-record refresh (`node_heartbeat`), seen when the record's `heartbeat_at` changes
  in the leader's replica (timed by the leader's own monotonic clock: no clock comparisons
  between machines). Written only when the node's free memory moved, or once a minute
  (membership.py), so it is a second witness, not the pulse.

A ready node silent for longer than `grace_s` (default 5 s) is marked `unreachable`; the
same command removes its instances, and the reconciler places them on nodes that can hold
them (delete + create through the scheduler). A node heard from again is marked `ready`. When
it comes back its agent finds its old instances gone from the state and stops them, so
nothing runs twice. A new leader gives every node a full grace from the moment it leads.

It wakes when something can change a verdict, not on a fixed beat: on a state change (a
new leader, a node record), and on the leader when the first node could run out of grace
(at most every `_MAX_CHECK_S`, and every `_CHECK_S` while a node is unreachable, to see it
come back). A follower only waits for state changes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from .state import ClusterStore, CommandRejected, RaftStatus, StateUnavailable

__all__ = ["LivenessMonitor", "DEFAULT_GRACE_S"]

log = logging.getLogger("gpumesh.liveness")

DEFAULT_GRACE_S = 5.0
_CHECK_S = 0.25
_MAX_CHECK_S = 1.0
_FOLLOWER_WAIT_S = 5.0          # a bound only: a new leader is a state change and wakes it
_PAST_DEADLINE_S = 0.01         # check just after a grace runs out, not just before


class LivenessMonitor:
    def __init__(self, store: ClusterStore, grace_s: float = DEFAULT_GRACE_S) -> None:
        self._store = store
        self.grace_s = grace_s
        self._leading = False
        self._heard: dict[str, float] = {}          # node id -> monotonic time last heard
        self._beats: dict[str, Any] = {}            # node id -> last heartbeat_at seen

    async def run(self) -> None:
        view = self._store.view
        wait = _CHECK_S
        while True:
            view = await self._store.wait_changed(view.version, timeout=wait)
            status = self._store.status
            if not status.is_leader:
                self._leading = False
                wait = _FOLLOWER_WAIT_S
                continue
            try:
                await self.check_once(status, time.monotonic())
            except StateUnavailable as exc:
                log.warning("liveness: cannot record a node's state now: %s", exc)
            view = self._store.view
            wait = self.next_check_in(time.monotonic())

    def next_check_in(self, now: float) -> float:
        """Seconds until a verdict could change with no state change: the first ready
        node's grace running out (bounded by `_MAX_CHECK_S`: its Raft answers, which
        postpone that moment, are not state changes), or `_CHECK_S` while a node is
        unreachable (it is back once heard from, which is not a state change either)."""
        nodes = list(self._store.view.nodes.values())
        if any(n.get("status") == "unreachable" for n in nodes):
            return _CHECK_S
        deadlines = [self._heard[n["id"]] + self.grace_s for n in nodes
                     if n.get("status") == "ready" and n["id"] in self._heard]
        if not deadlines:
            return _MAX_CHECK_S
        due = min(deadlines) - now
        if due <= 0:                 # past, yet still ready: the mark failed; try again soon
            return _CHECK_S
        return min(due + _PAST_DEADLINE_S, _MAX_CHECK_S)

    async def check_once(self, status: RaftStatus, now: float) -> None:
        view = self._store.view
        if not self._leading:            # just elected: everyone starts with a full grace
            self._leading = True
            self._heard = {node_id: now for node_id in view.nodes}
            self._beats = {n["id"]: n.get("heartbeat_at") for n in view.nodes.values()}
        holding = {i["node_id"] for i in view.instances.values()}
        holding.update(w["node_id"] for i in view.instances.values()      # RPC workers
                       for w in (i.get("allocation") or {}).get("workers") or ())
        for node in list(view.nodes.values()):
            silent = self._silence(node, status, now)
            if node.get("status") == "ready" and silent > self.grace_s:
                await self._mark(node, "unreachable", f"no sign of life for {silent:.1f} s")
            elif node.get("status") == "unreachable" and silent < self.grace_s / 2:
                await self._mark(node, "ready", "heard from again")
            elif node.get("status") == "stopped" and node["id"] in holding:
                # It said goodbye (Ctrl-C) with instances assigned: they serve elsewhere.
                await self._mark(node, "stopped", "stopped with instances assigned")

    def _silence(self, node: dict[str, Any], status: RaftStatus, now: float) -> float:
        node_id = node["id"]
        if node.get("raft_address") == status.self_address:
            self._heard[node_id] = now               # the leader hears itself
        beat = node.get("heartbeat_at")
        if self._beats.get(node_id) != beat:
            self._beats[node_id] = beat
            self._heard[node_id] = now
        ack_age = _ack_age(status, node.get("raft_address"), now)
        if ack_age is not None:
            self._heard[node_id] = max(self._heard.get(node_id, 0.0), now - ack_age)
        return now - self._heard.setdefault(node_id, now)

    async def _mark(self, node: dict[str, Any], status: str, reason: str) -> None:
        try:
            result = await self._store.submit({
                "op": "set_node_status", "id": node["id"], "status": status,
                "if_status": node.get("status"), "reason": reason, "at": time.time(),
                "evict": status != "ready"},
                timeout=self.grace_s)
        except CommandRejected as exc:               # changed meanwhile: next round decides
            log.debug("liveness: %s: %s", node["id"], exc)
            return
        moved = result.get("instances_removed") or []
        if status != "ready":
            log.warning("node %s (%s) is %s: %s; moving %d instance(s) elsewhere%s",
                        node["name"], node["id"], status, reason, len(moved),
                        f" ({', '.join(moved)})" if moved else "")
        else:
            log.info("node %s (%s) is ready again: %s", node["name"], node["id"], reason)


def _ack_age(status: RaftStatus, address: str | None, now: float) -> float | None:
    """Seconds since the leader last heard this peer's Raft answers, if the store says."""
    for peer in getattr(status, "peers", ()):
        if peer.address == address:
            return peer.silent_for(now)
    return None
