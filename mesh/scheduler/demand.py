"""How many replicas a model wants now, and which idle instances may make room for it.

A model normally wants `replicas` instances. An on-demand model (`min_replicas` below
`replicas`, e.g. `--min-replicas 0`) wants `replicas` only while it is *active* — a request
is in flight, or the last one ended within `idle_timeout_s` — and `min_replicas` otherwise.
Activity reaches the state as `last_request` (the end of the last request a gateway saw end;
gateways batch it: one write per node per flush interval, not one per request; a request
that finds no running instance writes at once to wake the model) and as `busy` marks, one
per node with requests in flight, refreshed every flush while they last. A mark older than
`BUSY_LEASE_S` is from a node that went away mid-request and no longer counts.

When a model cannot be placed for lack of memory, instances of other on-demand models that
are idle (no request for `evict_idle_s`) may be evicted, least recently used first. An
evicted model is marked (`evicted_at`) so it stays down until its next request instead of
pushing back at once.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from .capacity import ClusterIndex
from .plan import Placement, Unschedulable

__all__ = ["BUSY_LEASE_S", "DEFAULT_IDLE_TIMEOUT_S", "EVICT_IDLE_S", "Eviction", "is_active",
           "is_busy", "is_on_demand", "last_activity", "plan_eviction", "wanted_replicas"]

DEFAULT_IDLE_TIMEOUT_S = 300.0
# An on-demand model's instance with no request for this long may be evicted for another
# model (the idle timeout proper stops it anyway; eviction only comes sooner when needed).
EVICT_IDLE_S = 10.0
# A busy mark counts this long after its node last refreshed it (every flush, ≤ 5 s): long
# enough for writes delayed by an election, short enough that a node lost mid-stream does
# not keep its models up for long.
BUSY_LEASE_S = 60.0


def is_on_demand(model: Mapping[str, Any]) -> bool:
    least = model.get("min_replicas")
    return least is not None and int(least) < int(model["replicas"])


def last_activity(model: Mapping[str, Any]) -> float:
    """When the model was last asked for (its deploy time if never)."""
    return float(model.get("last_request") or 0.0)


def is_busy(model: Mapping[str, Any], now: float) -> bool:
    """Some node has requests in flight for the model (a fresh busy mark)."""
    return any(now - float(at) < BUSY_LEASE_S for at in (model.get("busy") or {}).values())


def is_active(model: Mapping[str, Any], now: float) -> bool:
    if is_busy(model, now):
        return True               # never stopped under a request, however long it runs
    last = model.get("last_request")
    if last is None:
        return False
    evicted = model.get("evicted_at")
    if evicted is not None and evicted >= last:
        return False
    timeout = float(model.get("idle_timeout_s") or DEFAULT_IDLE_TIMEOUT_S)
    return now - float(last) < timeout


def wanted_replicas(model: Mapping[str, Any], now: float) -> int:
    replicas = int(model["replicas"])
    if not is_on_demand(model) or is_active(model, now):
        return replicas
    return int(model["min_replicas"])


class Eviction:
    """Instances to stop so that `placement` fits, and the models they belong to."""

    def __init__(self, instance_ids: list[str], models: list[str], placement: Placement) -> None:
        self.instance_ids = instance_ids
        self.models = models
        self.placement = placement


def plan_eviction(model: Mapping[str, Any], index: ClusterIndex,
                  models: Mapping[str, Mapping[str, Any]], now: float,
                  place: Callable[[Mapping[str, Any], ClusterIndex], Placement | Unschedulable],
                  evict_idle_s: float = EVICT_IDLE_S) -> Eviction | None:
    """The fewest least-recently-used idle instances whose removal lets `model` fit.

    Removes candidates from `index` one by one (oldest activity first) until the model
    fits, then puts back those it did not need, newest first. Leaves the index as it found
    it (the caller's next sync restores any difference). None: nothing idle makes room.
    """
    candidates = sorted(
        (i for i in index.instances.values()
         if i["model"] != model["name"] and _evictable(i, models, now, evict_idle_s)),
        key=lambda i: (last_activity(models[i["model"]]), i.get("created", 0.0), i["id"]))
    removed: list[Mapping[str, Any]] = []
    placement: Placement | None = None
    try:
        for victim in candidates:
            index.unbook(victim["id"])
            removed.append(victim)
            outcome = place(model, index)
            if isinstance(outcome, Placement):
                placement = outcome
                break
        if placement is None:
            return None
        needed = list(removed)
        for victim in reversed(removed[:-1]):      # the last one was needed to fit
            index.restore(victim)
            outcome = place(model, index)
            if isinstance(outcome, Placement):
                needed.remove(victim)
                placement = outcome
            else:
                index.unbook(victim["id"])
        return Eviction([v["id"] for v in needed], sorted({v["model"] for v in needed}), placement)
    finally:
        for victim in removed:
            index.restore(victim)


def _evictable(instance: Mapping[str, Any], models: Mapping[str, Mapping[str, Any]],
               now: float, evict_idle_s: float) -> bool:
    owner = models.get(instance["model"])
    if owner is None or not is_on_demand(owner):
        return False
    if instance.get("state") not in ("running", "error"):
        return False               # starting for someone who is waiting: leave it
    if is_busy(owner, now):
        return False               # serving requests now
    return now - last_activity(owner) >= evict_idle_s
