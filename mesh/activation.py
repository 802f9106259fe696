"""On-demand models, the node's side: remember requests, wake a model scaled to zero.

The gateway calls `before_forward(model)` once per request, before it looks for a running
instance (one call site). That call

* notes the time in memory — idleness costs no Raft write per request: `run()` sends one
  `record_activity` per flush interval with every model this node served since the last one;
* for an on-demand model with no running instance, writes `record_activity` with `wake` at
  once (one write, shared by every request that arrives meanwhile), then waits until an
  instance runs, the leader says why it cannot place one (`schedule_error`), or
  `wake_timeout_s` passes. The gateway then forwards, or answers 503 with the reason.

The leader's side (how many replicas a model wants, idle timeout, eviction) is
`scheduler/demand.py`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import AsyncIterator, Callable

from aiohttp import web

from .scheduler.demand import DEFAULT_IDLE_TIMEOUT_S, is_on_demand
from .state import ClusterStore, CommandRejected, StateUnavailable, StateView

__all__ = ["ACTIVATION", "Activation", "FLUSH_INTERVAL_S", "WAKE_TIMEOUT_S"]

log = logging.getLogger("gpumesh.activation")

# Longest gap between activity writes; shorter when a model's idle timeout is short (a
# quarter of the shortest), so `last_request` never lags its timeout by much.
FLUSH_INTERVAL_S = 5.0
_MIN_FLUSH_INTERVAL_S = 0.25
# How long the first request to a scaled-to-zero model waits for an instance to start.
WAKE_TIMEOUT_S = 120.0


class Activation:
    def __init__(self, store: ClusterStore, *, wake_timeout_s: float = WAKE_TIMEOUT_S,
                 clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self.wake_timeout_s = wake_timeout_s
        self._clock = clock
        self._seen: dict[str, float] = {}        # model -> last request served here
        self._told: dict[str, float] = {}        # model -> last time sent to the cluster
        self._waking: dict[str, asyncio.Task[None]] = {}

    # --- the gateway's call ----------------------------------------------------------------

    async def before_forward(self, model_name: str) -> bool:
        """Note the request; if the model sleeps, wake it and wait (bounded) for an instance.
        True when it waited: the caller looks at the state again."""
        self._seen[model_name] = self._clock()
        view = self._store.view
        model = view.models.get(model_name)
        if model is None or not is_on_demand(model) or _running(view, model_name):
            return False
        task = self._waking.get(model_name)
        if task is None or task.done():
            task = asyncio.create_task(self._wake(model_name), name=f"wake-{model_name}")
            self._waking[model_name] = task
        # shield: a client that gives up does not cancel the wait others share
        await asyncio.shield(task)
        return True

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
            await asyncio.sleep(self._flush_interval())
            pending = {m: t for m, t in self._seen.items() if t > self._told.get(m, 0.0)}
            if not pending:
                continue
            try:
                await self._store.submit({"op": "record_activity", "models": pending})
            except (StateUnavailable, CommandRejected) as exc:
                log.debug("activity not recorded now (next round): %s", exc)
                continue
            self._told.update(pending)

    def _flush_interval(self) -> float:
        timeouts = [float(m.get("idle_timeout_s") or DEFAULT_IDLE_TIMEOUT_S)
                    for name, m in self._store.view.models.items()
                    if name in self._seen and is_on_demand(m)]
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
