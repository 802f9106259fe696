"""Metering: what each key used, counted in memory and folded into the replicated state.

The gateway calls `Meter.record` once per request (a dict update, no I/O). A task folds the
counts into the state about once a second while there is traffic (`fold_usage`, one
replicated command per node per interval, never one per request), together with the
limiter's counters (mesh/limits.py), so the other nodes enforce limits with them.

Nothing counted is lost by a clean stop: `stop()` folds what is left, after the HTTP site
has stopped taking requests. A batch whose outcome is unknown (the write timed out) is sent
again unchanged, with the same sequence number, until it is known to be in: the state
machine ignores a sequence number it has seen, so a count is never folded twice. A node
cut off from the quorum keeps counting in memory and folds it all when it can write again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable

from .auth import Principal
from .limits import Limiter
from .state import ClusterStore, CommandRejected, StateUnavailable

__all__ = ["FOLD_INTERVAL_S", "Meter", "USAGE_RETENTION_S"]

log = logging.getLogger("gpumesh.metering")

FOLD_INTERVAL_S = 1.0
USAGE_RETENTION_S = 366 * 86400     # hourly totals older than this are dropped
_SUBMIT_TIMEOUT_S = 5.0
_STOP_DEADLINE_S = 10.0

# (hour start, serving node, key id, user, model) → [requests, errors, prompt, completion]
RowKey = tuple[int, str, str, str, str]


class Meter:
    def __init__(self, store: ClusterStore, node_id: str, limiter: Limiter,
                 clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._node_id = node_id
        self._limiter = limiter
        self._clock = clock
        self._pending: dict[RowKey, list[int]] = {}
        self._unsent: dict[str, Any] | None = None     # a batch whose outcome is not known
        self._seq = 0

    def record(self, principal: Principal, model: str, node: str, prompt_tokens: int,
               completion_tokens: int, error: bool) -> None:
        hour = int(self._clock()) // 3600 * 3600
        key = (hour, node, principal.key_id, principal.user, model)
        row = self._pending.get(key)
        if row is None:
            self._pending[key] = [1, int(error), prompt_tokens, completion_tokens]
        else:
            row[0] += 1
            row[1] += error
            row[2] += prompt_tokens
            row[3] += completion_tokens

    async def run(self) -> None:
        """Fold every FOLD_INTERVAL_S until cancelled."""
        while True:
            await asyncio.sleep(FOLD_INTERVAL_S)
            await self.flush()

    async def stop(self) -> None:
        """Fold what is left (the site has stopped: nothing new comes in), within a deadline."""
        deadline = time.monotonic() + _STOP_DEADLINE_S
        while self._unsent is not None or self._pending or self._limiter.dirty:
            if not await self.flush() and (time.monotonic() > deadline
                                           or not self._store.running):
                lost = sum(row[0] for row in self._pending.values())
                log.warning("could not fold the last usage before stopping: %d request(s) "
                            "not recorded", lost + len((self._unsent or {}).get("rows", ())))
                return
            if self._unsent is not None:
                await asyncio.sleep(0.2)

    async def flush(self) -> bool:
        """Send one batch (the unsent one first); False if the state could not take it."""
        if self._unsent is None:
            if not self._pending and not self._limiter.dirty:
                return True
            self._unsent = self._next_batch()
        try:
            await self._store.submit(self._unsent, timeout=_SUBMIT_TIMEOUT_S)
        except StateUnavailable as exc:
            log.debug("usage batch %d not folded yet: %s", self._unsent["seq"], exc)
            return False
        except CommandRejected as exc:   # a bug, not a condition: say so and move on
            log.error("usage batch %d refused: %s", self._unsent["seq"], exc)
        self._unsent = None
        return True

    def _next_batch(self) -> dict[str, Any]:
        rows, self._pending = self._pending, {}
        known = self._store.view.rates.get(self._node_id, {}).get("seq", 0)
        self._seq = max(self._seq, known) + 1
        now = self._clock()
        # The rid makes a resubmitted batch apply once (commands/requests.py); the sequence
        # number does too, however long the retry takes.
        return {"op": "fold_usage", "rid": f"usage-{self._node_id}-{self._seq}",
                "node": self._node_id, "seq": self._seq, "at": now,
                "rows": [[*key, *counts] for key, counts in rows.items()],
                "rates": self._limiter.report(),
                "keep_after": int(now - USAGE_RETENTION_S) // 3600 * 3600}
