"""On-demand models, the node's side: remember requests, wake a model scaled to zero.

The gateway calls `before_forward(model)` once per request (as `note`, then `wake` only when
needed: no coroutine per request), before it looks for a running instance, and
`started(model)` / `finished(model)` around each call to an engine. Together

* they note times in memory — idleness costs no Raft write per request: `run()` sends one
  `record_activity` per flush interval with every model this node served since the last one.
  The time is a request's *end* once it ends, so a model's idleness counts from the end of
  its last request, not from the start of a long stream;
* while a model has requests in flight here, each flush also marks it busy for this node
  (`busy`, refreshed every flush, cleared by the first flush after the last one ends): the
  leader never stops or evicts a busy model's instances, however long the stream;
* for an on-demand model with no running instance, writes `record_activity` with `wake` at
  once (one write, shared by every request that arrives meanwhile), then waits until an
  instance runs, the leader says why it cannot place one (`schedule_error`), or
  `wake_timeout_s` passes. The gateway then forwards, or answers 503 with the reason. A
  request waiting for a wake is in flight too (the model is busy meanwhile).

The leader's side (how many replicas a model wants, idle timeout, eviction) is
`scheduler/demand.py`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from typing import AsyncIterator, Callable

from aiohttp import web

from .scheduler.demand import DEFAULT_IDLE_TIMEOUT_S, is_on_demand
from .replicated import StateView
from .state import ClusterStore, CommandRejected, StateUnavailable

__all__ = ["ACTIVATION", "Activation", "FLUSH_INTERVAL_S", "WAKE_TIMEOUT_S"]

log = logging.getLogger("gpumesh.activation")

# Longest gap between activity writes; shorter when a model's idle timeout is short (a
# quarter of the shortest), so `last_request` never lags its timeout by much.
FLUSH_INTERVAL_S = 5.0
_MIN_FLUSH_INTERVAL_S = 0.25
# How long the first request to a scaled-to-zero model waits for an instance to start.
WAKE_TIMEOUT_S = 120.0


class Activation:
    def __init__(self, store: ClusterStore, node_id: str = "", *,
                 wake_timeout_s: float = WAKE_TIMEOUT_S,
                 clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._node_id = node_id
        self.wake_timeout_s = wake_timeout_s
        self._clock = clock
        self._seen: dict[str, float] = {}        # model -> last request served here
        self._told: dict[str, float] = {}        # model -> last time sent to the cluster
        self._in_flight: Counter[str] = Counter()   # model -> engine calls under way here
        self._busy_told: frozenset[str] = frozenset()   # busy as the cluster last heard it
        self._nudge = asyncio.Event()            # flush now: a model just became busy
        self._waking: dict[str, asyncio.Task[None]] = {}

    # --- the gateway's call ----------------------------------------------------------------

    async def before_forward(self, model_name: str) -> bool:
        """Note the request; if the model sleeps, wake it and wait (bounded) for an instance.
        True when it waited: the caller looks at the state again."""
        if not self.note(model_name):
            return False
        await self.wake(model_name)
        return True

    def note(self, model_name: str) -> bool:
        """`before_forward` without a coroutine for the usual case: note the request; True
        when the model sleeps and must be woken (`wake`) before it can answer."""
        self._seen[model_name] = self._clock()
        view = self._store.view
        model = view.models.get(model_name)
        return not (model is None or not is_on_demand(model) or _running(view, model_name))

    async def wake(self, model_name: str) -> None:
        """Wake a sleeping model (once, whoever asks) and wait, bounded, for an instance.

        A request waiting here is in flight: the model is marked busy while it waits, so
        the leader keeps wanting it however long the decision and the engine's start take.
        (`last_request` alone is the request's arrival: with a short idle timeout, a leader
        deciding late under load found the model idle again and placed nothing, or stopped
        the instance while it was starting, and the request waited its whole wake timeout.)
        """
        task = self._waking.get(model_name)
        if task is None or task.done():
            task = asyncio.create_task(self._wake(model_name), name=f"wake-{model_name}")
            self._waking[model_name] = task
        self.started(model_name)
        try:
            # shield: a client that gives up does not cancel the wait others share
            await asyncio.shield(task)
        finally:
            self.finished(model_name)

    def started(self, model_name: str) -> None:
        """A request to one of the model's engines begins (the gateway's forward). An
        on-demand model the cluster does not know busy yet is marked at once, not at the
        next flush: its idle timeout may be shorter than the flush interval."""
        self._in_flight[model_name] += 1
        if model_name not in self._busy_told:
            model = self._store.view.models.get(model_name)
            if model is not None and is_on_demand(model):
                self._nudge.set()

    def finished(self, model_name: str) -> None:
        """It ended (answered, failed or cut): idleness counts from now."""
        self._seen[model_name] = self._clock()
        self._in_flight[model_name] -= 1
        if self._in_flight[model_name] <= 0:
            del self._in_flight[model_name]

    async def _wake(self, model_name: str) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wake_timeout_s
        now = self._clock()
        try:
            await self._store.submit({"op": "record_activity", "models": {model_name: now},
                                      "wake": True})
        except (StateUnavailable, CommandRejected) as exc:
            log.warning("could not wake %s: %s", model_name, exc)
            return
        self._told[model_name] = now
        log.info("woke %s on its first request; waiting up to %.0f s for an instance",
                 model_name, self.wake_timeout_s)
        version = -1
        while (remaining := deadline - loop.time()) > 0:
            view = await self._store.wait_changed(version, timeout=remaining)
            version = view.version
            model = view.models.get(model_name)
            if model is None or _running(view, model_name) or model.get("schedule_error"):
                return

    # --- telling the cluster, in batches -----------------------------------------------------

    async def run(self) -> None:
        """Send what this node served, at most once per flush interval, until cancelled."""
        while True:
            try:               # (asyncio.timeout: wait_for can swallow a cancel, state.py)
                async with asyncio.timeout(self._flush_interval()):
                    await self._nudge.wait()
            except TimeoutError:
                pass
            self._nudge.clear()
            await self.flush()

    async def flush(self) -> None:
        """One `record_activity`, if there is anything to say: requests served since the
        last one, models busy now (refreshing their mark), or busy marks to clear."""
        pending = {m: t for m, t in self._seen.items() if t > self._told.get(m, 0.0)}
        models = self._store.view.models
        busy = frozenset(m for m in self._in_flight     # only on-demand models can stop
                         if m in models and is_on_demand(models[m]))
        if not pending and not busy and busy == self._busy_told:
            return
        try:
            await self._store.submit({"op": "record_activity", "models": pending,
                                      "node_id": self._node_id, "busy": sorted(busy),
                                      "at": self._clock()})
        except (StateUnavailable, CommandRejected) as exc:
            log.debug("activity not recorded now (next round): %s", exc)
            return
        self._told.update(pending)
        self._busy_told = busy

    def _flush_interval(self) -> float:
        timeouts = [float(m.get("idle_timeout_s") or DEFAULT_IDLE_TIMEOUT_S)
                    for name, m in self._store.view.models.items()
                    if (name in self._seen or name in self._in_flight) and is_on_demand(m)]
        return max(_MIN_FLUSH_INTERVAL_S, min([FLUSH_INTERVAL_S, *(t / 4 for t in timeouts)]))

    async def part(self, app: web.Application) -> AsyncIterator[None]:
        """aiohttp cleanup_ctx: the flush task lives as long as the app; wakes are cancelled."""
        flusher = asyncio.create_task(self.run(), name="activity-flush")
        try:
            yield
        finally:
            for task in [flusher, *self._waking.values()]:
                task.cancel()
            await asyncio.gather(flusher, *self._waking.values(), return_exceptions=True)


def _running(view: StateView, model_name: str) -> bool:
    return any(i["state"] == "running" and i.get("port") for i in view.instances_of(model_name))


ACTIVATION = web.AppKey("activation", Activation)
