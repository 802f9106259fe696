"""Rate limits per key and per user: requests/min, tokens/min, requests in flight.

Each node counts what its own gateway admits, in one-second slots over a sliding minute
(O(1) per request). Nodes share their counts through the metering batches
(mesh/metering.py): about once a second a node with traffic folds a report of its counters
into the replicated state (`rates`), and every node adds the other nodes' latest reports to
its own counts before it admits a request.

Tolerance, stated: a node sees the others' counts up to ~1 s late (the fold interval plus a
commit), so a key spread over N nodes can pass its limit by what the other N-1 nodes admit
in that second; a report counts in full until it is a minute old (it may count requests
that already left the window: conservative). Tokens are known after an answer: a request is
admitted while the minute's tokens are under the limit, so the one that crosses it finishes.
During a partition a node keeps enforcing with the last reports it has until they are a
minute old, then with its own counts alone: each side of a split then admits up to the
whole limit (the minority side keeps its usage in memory and folds it once it can write).
Clocks are assumed to agree within a second or two (NTP): reports are dated by their node.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

from .auth import Principal

__all__ = ["Limiter", "Refusal", "Ticket", "WINDOW_S"]

WINDOW_S = 60            # the minute of "per minute"
REPORT_TTL_S = 60.0      # another node's report counts for this long after it was made
_LIMIT_NAMES = {"rpm": "requests per minute", "tpm": "tokens per minute",
                "concurrency": "concurrent requests"}


class Window:
    """Counts over the last WINDOW_S seconds, one slot per second, with a running total."""

    __slots__ = ("slots", "second", "total")

    def __init__(self) -> None:
        self.slots = [0] * WINDOW_S
        self.second = 0
        self.total = 0

    def _advance(self, now: int) -> None:
        gap = now - self.second
        if gap <= 0:
            return
        if gap >= WINDOW_S:
            self.slots = [0] * WINDOW_S
            self.total = 0
        else:
            for second in range(self.second + 1, now + 1):
                slot = second % WINDOW_S
                self.total -= self.slots[slot]
                self.slots[slot] = 0
        self.second = now

    def add(self, now: int, count: int) -> None:
        if now != self.second:
            self._advance(now)
        self.slots[now % WINDOW_S] += count
        self.total += count

    def count(self, now: int) -> int:
        if now != self.second:
            self._advance(now)
        return self.total

    def seconds_until_freed(self, now: int, amount: int) -> int:
        """How long until at least `amount` of the local count has left the window."""
        self._advance(now)
        freed = 0
        for age in range(WINDOW_S - 1, -1, -1):          # oldest slot first
            freed += self.slots[(now - age) % WINDOW_S]
            if freed >= amount:
                return WINDOW_S - age
        return WINDOW_S


@dataclass(slots=True)
class Counters:
    requests: Window
    tokens: Window
    in_flight: int = 0

    def snapshot(self, now: int) -> list[int]:
        return [self.requests.count(now), self.tokens.count(now), self.in_flight]


@dataclass(frozen=True, slots=True)
class Refusal:
    message: str
    retry_after_s: int
    limit: str               # "rpm" | "tpm" | "concurrency"


# What admit() hands back for a request it let through: the counters to settle on finish.
Ticket = tuple[Counters, ...]


class Limiter:
    """This node's counters, plus the other nodes' reports read from the replicated state."""

    def __init__(self, node_id: str, rates: Callable[[], dict[str, dict[str, Any]]],
                 clock: Callable[[], float] = time.time) -> None:
        self._node_id = node_id
        self._rates = rates
        self._clock = clock
        self._counters: dict[tuple[str, str], Counters] = {}   # ("key"|"users", id) → counts
        self._foreign: dict[tuple[str, str], list[int]] = {}
        self._foreign_basis: tuple[Any, int] = (None, -1)
        # key id → (its Principal, (scope, id, limits, counters) per limited scope, ticket)
        self._plans: dict[str, tuple[Principal, tuple[Any, ...], Ticket]] = {}
        self.dirty = False        # something changed since the last report

    def admit(self, principal: Principal) -> Ticket | Refusal:
        """Count the request in, or say which limit it is over and when to come back."""
        now = int(self._clock())
        foreign = self._foreign_counts(now)
        plan = self._plans.get(principal.key_id)
        if plan is None or plan[0] is not principal:
            plan = self._plan(principal)
        _, scopes, ticket = plan
        for scope, ident, limits, counters in scopes:
            refusal = self._check(scope, ident, limits, counters, now,
                                  foreign.get((scope, ident), _ZERO) if foreign else _ZERO)
            if refusal is not None:
                return refusal
        for counters in ticket:
            counters.requests.add(now, 1)
            counters.in_flight += 1
        self.dirty = True
        return ticket

    def finish(self, ticket: Ticket, tokens: int) -> None:
        if not ticket:
            return
        now = int(self._clock())
        for counters in ticket:
            counters.in_flight -= 1
            if tokens:
                counters.tokens.add(now, tokens)
        self.dirty = True

    def report(self) -> dict[str, dict[str, list[int]]]:
        """This node's counters for the next metering batch; idle ones are dropped after."""
        now = int(self._clock())
        report: dict[str, dict[str, list[int]]] = {"keys": {}, "users": {}}
        for (scope, ident), counters in list(self._counters.items()):
            snapshot = counters.snapshot(now)
            if any(snapshot):
                report[scope][ident] = snapshot
            else:
                del self._counters[(scope, ident)]
                self._plans.clear()              # they may hold the dropped counters
        self.dirty = False
        return report

    # --- internals -------------------------------------------------------------------------

    def _plan(self, principal: Principal) -> tuple[Principal, tuple[Any, ...], Ticket]:
        """What admit() checks for a principal: its scopes with limits, and their counters
        (kept per key while its Principal and the counters stay the same objects)."""
        scopes = tuple((scope, ident, limits, self._counters_of(scope, ident))
                       for scope, ident, limits in (
                           ("keys", principal.key_id, principal.key_limits),
                           ("users", principal.user, principal.user_limits)) if limits)
        plan = (principal, scopes, tuple(entry[3] for entry in scopes))
        if len(self._plans) >= 100_000:
            self._plans.clear()
        self._plans[principal.key_id] = plan
        return plan

    def _counters_of(self, scope: str, ident: str) -> Counters:
        counters = self._counters.get((scope, ident))
        if counters is None:
            counters = self._counters[(scope, ident)] = Counters(Window(), Window())
        return counters

    def _check(self, scope: str, ident: str, limits: dict[str, int], counters: Counters,
               now: int, foreign: Any) -> Refusal | None:
        who = "API key" if scope == "keys" else "user"
        rpm = limits.get("rpm")
        if rpm is not None:
            over = counters.requests.count(now) + foreign[0] - rpm + 1
            if over > 0:
                return Refusal(f"Rate limit reached for {who} {ident}: {rpm} "
                               f"{_LIMIT_NAMES['rpm']}.",
                               counters.requests.seconds_until_freed(now, over), "rpm")
        tpm = limits.get("tpm")
        if tpm is not None:
            used = counters.tokens.count(now) + foreign[1]
            if used >= tpm:
                return Refusal(f"Rate limit reached for {who} {ident}: {tpm} "
                               f"{_LIMIT_NAMES['tpm']} ({used} used).",
                               counters.tokens.seconds_until_freed(now, used - tpm + 1), "tpm")
        concurrency = limits.get("concurrency")
        if concurrency is not None and counters.in_flight + foreign[2] >= concurrency:
            return Refusal(f"Too many concurrent requests for {who} {ident}: at most "
                           f"{concurrency}.", 1, "concurrency")
        return None

    def _foreign_counts(self, now: int) -> dict[tuple[str, str], list[int]]:
        """The other nodes' fresh reports, summed; rebuilt when they change or a second ends."""
        rates = self._rates()
        basis_rates, basis_second = self._foreign_basis
        if basis_rates is not rates or basis_second != now:
            totals: dict[tuple[str, str], list[int]] = {}
            for node, report in rates.items():
                if node == self._node_id or report.get("at", 0) < now - REPORT_TTL_S:
                    continue
                for scope in ("keys", "users"):
                    for ident, counts in report.get(scope, {}).items():
                        total = totals.setdefault((scope, ident), [0, 0, 0])
                        for i in range(3):
                            total[i] += counts[i]
            self._foreign, self._foreign_basis = totals, (rates, now)
        return self._foreign


_ZERO = (0, 0, 0)
