"""`GET /api/events`: one Server-Sent Events stream with everything a console shows live.

Why SSE and not a WebSocket: the stream only flows from the node to the console (commands
go through the ordinary REST routes), so SSE is enough; it is plain HTTP, so the admin
middleware, the OpenAI-shaped errors and any proxy apply unchanged; `curl -N` can read it;
and aiohttp's client reads it line by line with no extra protocol.

What flows, in order (each an SSE `event:` with one JSON `data:` line):

* `snapshot` — the whole picture once, on connect: this node's id, the Raft status, nodes,
  models (their summaries), instances and API keys (never their hashes), and a version.
* `change` — every replicated change since the last one sent, as records to upsert or ids to
  remove per collection, plus the same change in words (`events.describe_changes`). Changes
  that land faster than the client reads are coalesced (diffed from the last view *sent*).
* `raft` — the Raft status (leader, term, quorum, members) whenever it differs.
* `telemetry` — once a second: every node's latest sample (GPUs, CPU, memory), fetched from
  each node's `/api/telemetry` with the caller's own key (fan-out). A node that does not
  answer within 0.8 s is reported at once (`ok: false` and why), which is how a node going
  away shows before liveness marks it. A node without a sampler (an older node, or an app
  served without the daemon's parts) reports the inventory it registered (`source`).
* `telemetry_history` — with `?history=SECONDS` (up to 600), once after the snapshot: every
  node's samples of that window (GPU readings only), so a console's charts start full.

`?telemetry=0` leaves telemetry out (a keep-alive comment is sent every 15 s instead).
Each open stream owns two small tasks (the state watcher and the sampler); they hold only
the latest value, so a slow reader costs no memory. The daemon's shutdown closes the streams
(`on_shutdown`), so an open console never holds a stopping node up.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import weakref
from typing import Any, AsyncIterator, Callable

import aiohttp
from aiohttp import web

from .api import model_summary
from .auth import key_from_request
from .errors import openai_error
from .events import describe_changes
from .replicated import StateView
from .state import ClusterStore

__all__ = ["EventStream", "public_snapshot", "state_changes"]

log = logging.getLogger("gpumesh.events")

TELEMETRY_PERIOD_S = 1.0
_KEEPALIVE_S = 15.0
_MAX_HISTORY_S = 600.0            # what a node's telemetry ring keeps
# A node must answer its telemetry within this, or it counts as unreachable for this tick.
_FETCH_TIMEOUT_S = 0.8

Record = dict[str, Any]


class EventStream:
    """The `/api/events` route and the streams it has open."""

    def __init__(self, store: ClusterStore, node_id: str, session: aiohttp.ClientSession):
        self._store = store
        self._node_id = node_id
        self._session = session
        self._open: weakref.WeakSet[_Stream] = weakref.WeakSet()

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/api/events", self.events)
        app.on_shutdown.append(self._close_all)

    async def _close_all(self, app: web.Application) -> None:
        for stream in list(self._open):
            stream.close()

    async def events(self, request: web.Request) -> web.StreamResponse:
        telemetry = request.query.get("telemetry", "1") not in ("0", "false", "no")
        try:
            history = float(request.query.get("history", "0"))
        except ValueError:
            history = -1.0
        if not 0 <= history <= _MAX_HISTORY_S:
            return openai_error(400, f"history must be seconds from 0 to {_MAX_HISTORY_S:.0f}",
                                param="history")
        response = web.StreamResponse(headers={
            "Content-Type": "text/event-stream", "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no"})
        await response.prepare(request)
        sampler = _Sampler(self._store, self._session, key_from_request(request) or "")
        stream = _Stream(self._store, self._node_id, response, sampler if telemetry else None,
                         history)
        self._open.add(stream)
        try:
            await stream.run()
        except (ConnectionResetError, asyncio.CancelledError):
            pass                                    # the client left; nothing to tell it
        return response


class _Stream:
    """One client's stream: wakes on a state change, a telemetry sample or a close."""

    def __init__(self, store: ClusterStore, node_id: str, response: web.StreamResponse,
                 sampler: _Sampler | None, history_s: float = 0.0) -> None:
        self._store = store
        self._history_s = history_s
        self._history: Record | None = None
        self._node_id = node_id
        self._response = response
        self._sampler = sampler
        self._wake = asyncio.Event()
        self._closing = False
        self._state_pending = False
        self._keepalive_due = False
        self._sample: Record | None = None

    def close(self) -> None:
        self._closing = True
        self._wake.set()

    async def run(self) -> None:
        sent = self._store.view
        raft = self._store.status.to_dict()
        await self._send("snapshot", public_snapshot(sent, raft, self._node_id))
        async with self._owned(self._watch_state(sent.version)), \
                self._owned(self._produce_samples()):
            while not self._closing:
                await self._wake.wait()
                self._wake.clear()
                if self._keepalive_due:
                    self._keepalive_due = False
                    await self._response.write(b": keep-alive\n\n")
                if self._state_pending:
                    self._state_pending = False
                    sent = await self._send_changes(sent)
                if _raft_news(now := self._store.status.to_dict(), raft):
                    raft = now
                    await self._send("raft", raft)
                if self._history is not None:
                    history, self._history = self._history, None
                    await self._send("telemetry_history", history)
                if self._sample is not None:
                    sample, self._sample = self._sample, None
                    await self._send("telemetry", sample)

    async def _send_changes(self, sent: StateView) -> StateView:
        view = self._store.view
        if view.version == sent.version:
            return sent
        changes = state_changes(sent, view)
        if changes:
            await self._send("change", {"version": view.version, "changes": changes,
                                        "log": describe_changes(sent, view)})
        return view

    async def _watch_state(self, version: int) -> None:
        while True:
            version = (await self._store.wait_changed(version)).version
            self._state_pending = True
            self._wake.set()

    async def _produce_samples(self) -> None:
        loop = asyncio.get_running_loop()
        if self._sampler is None:
            while True:                             # no telemetry: keep proxies from idling out
                await asyncio.sleep(_KEEPALIVE_S)
                self._keepalive_due = True
                self._wake.set()
        if self._history_s > 0:
            self._history = await self._sampler.history(self._history_s)
        deadline = loop.time()
        while True:
            self._sample = await self._sampler.sample()
            self._wake.set()
            deadline = max(deadline + TELEMETRY_PERIOD_S, loop.time())   # steady 1 Hz, no burst
            await asyncio.sleep(deadline - loop.time())

    def _producer_done(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("an /api/events producer failed; closing the stream",
                      exc_info=task.exception())
        self.close()

    async def _send(self, event: str, data: Any) -> None:
        payload = json.dumps(data, separators=(",", ":"))
        await self._response.write(f"event: {event}\ndata: {payload}\n\n".encode())

    @contextlib.asynccontextmanager
    async def _owned(self, coro: Any) -> AsyncIterator[None]:
        """A producer task that lives as long as the stream; if it fails, the stream ends
        (a silent stream would look alive to the console)."""
        task = asyncio.create_task(coro)
        task.add_done_callback(self._producer_done)
        try:
            yield
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


class _Sampler:
    """Fans out to every node's `/api/telemetry` with the caller's key."""

    def __init__(self, store: ClusterStore, session: aiohttp.ClientSession, key: str) -> None:
        self._store = store
        self._session = session
        self._headers = {"Authorization": f"Bearer {key}"}

    async def sample(self) -> Record:
        """Every node's latest reading (a node's own sampler ticks at 1 Hz too)."""
        since = time.time()                         # only `latest`: no history in the body
        nodes, replies = await self._fan_out(since)
        return {"t": time.time(),
                "nodes": {n["id"]: _reading(n, r) for n, r in zip(nodes, replies)}}

    async def history(self, seconds: float) -> Record:
        """The last `seconds` of every node's samples, GPU readings only (names and totals
        are in the snapshot and in every 1 Hz sample)."""
        nodes, replies = await self._fan_out(time.time() - seconds)
        return {"nodes": {n["id"]: [_compact(s) for s in r.get("samples", [])]
                          for n, r in zip(nodes, replies) if isinstance(r, dict)}}

    async def _fan_out(self, since: float) -> tuple[list[Record], list[Record | str | None]]:
        nodes = list(self._store.view.nodes.values())
        return nodes, await asyncio.gather(*(self._fetch(node, since) for node in nodes))

    async def _fetch(self, node: Record, since: float) -> Record | str | None:
        """The node's /api/telemetry body; None where it has no sampler (older node, or an
        app served without the daemon's parts); else why it could not be read."""
        if node.get("status") == "stopped":
            return "stopped"
        try:
            async with self._session.get(
                    node["api_url"] + "/api/telemetry", params={"since": f"{since:.3f}"},
                    headers=self._headers,
                    timeout=aiohttp.ClientTimeout(total=_FETCH_TIMEOUT_S)) as reply:
                if reply.status in (404, 503):
                    return None
                if reply.status != 200:
                    return f"HTTP {reply.status}"
                return await reply.json()
        except asyncio.TimeoutError:
            return f"no answer within {_FETCH_TIMEOUT_S * 1000:.0f} ms"
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            return f"unreachable ({type(exc).__name__})"


# --- what the stream says -------------------------------------------------------------------

def public_snapshot(view: StateView, raft: Record, node_id: str) -> Record:
    snapshot = {"node_id": node_id, "version": view.version, "raft": raft,
                "nodes": sorted(view.nodes.values(), key=lambda n: n["name"]),
                "models": [_model(view, name) for name in sorted(view.models)],
                "instances": sorted(view.instances.values(), key=lambda i: i["id"]),
                "api_keys": sorted((_key(k) for k in view.api_keys.values()),
                                   key=lambda k: k["id"])}
    if (users := _users(view)) is not None:
        snapshot["users"] = sorted(users.values(), key=lambda u: u["id"])
    if (usage := _usage(view)) is not None:
        snapshot["usage"] = {hour: usage[hour] for hour in _recent_hours(usage)}
    return snapshot


def state_changes(old: StateView, new: StateView) -> list[Record]:
    """Structured changes from `old` to `new`: `{collection, op: upsert|remove, id, record}`.

    A model's summary depends on its instances (status, ready replicas), so a change to an
    instance re-sends its model too."""
    changes = _diff("nodes", old.nodes, new.nodes, lambda r: r["id"], lambda r: r)
    changes += _diff("instances", old.instances, new.instances, lambda r: r["id"], lambda r: r)
    changes += _diff("api_keys", old.api_keys, new.api_keys, lambda r: r["id"], _key)
    changes += _diff("users", _users(old) or {}, _users(new) or {}, lambda r: r["id"],
                     lambda r: r)
    changes += _usage_changes(_usage(old) or {}, _usage(new) or {})
    touched = {c["id"] for c in changes if c["collection"] == "instances"}
    touched = {(new.instances.get(i) or old.instances[i])["model"] for i in touched}
    touched |= {n for n in old.models.keys() | new.models.keys()
                if old.models.get(n) != new.models.get(n)}
    for name in sorted(touched):
        if name in new.models:
            changes.append({"collection": "models", "op": "upsert", "id": name,
                            "record": _model(new, name)})
        elif name in old.models:
            changes.append({"collection": "models", "op": "remove", "id": name})
    return changes


def _diff(collection: str, old: dict[str, Record], new: dict[str, Record],
          ident: Callable[[Record], str], public: Callable[[Record], Record]) -> list[Record]:
    changes = [{"collection": collection, "op": "remove", "id": ident(old[k])}
               for k in sorted(old.keys() - new.keys())]
    # Records are replaced, never mutated (commands are copy-on-write): identity is the
    # cheap test, equality the exact one (a node re-registering unchanged sends nothing).
    changes += [{"collection": collection, "op": "upsert", "id": ident(new[k]),
                 "record": public(new[k])}
                for k in sorted(new) if old.get(k) is not new[k] and old.get(k) != new[k]]
    return changes


# Collections the gateway adds to the state (users; usage metered by the hour): read where
# the view has them, so the stream works on nodes with and without them.
def _users(view: StateView) -> dict[str, Record] | None:
    return getattr(view, "users", None)


def _usage(view: StateView) -> dict[str, dict[str, Record]] | None:
    return getattr(view, "usage", None)


_USAGE_HOURS = 2         # the current hour and the one before: rates need no more, and the
                         # whole history can be large (rows per node × key × model × hour)


def _recent_hours(usage: dict[str, Any]) -> list[str]:
    return sorted(usage, key=int)[-_USAGE_HOURS:]


def _usage_changes(old: dict[str, Any], new: dict[str, Any]) -> list[Record]:
    """The recent hours whose rows changed (a node's fold replaces one hour's rows), whole;
    hours the state dropped are removed (the console forgets older ones by itself)."""
    changes = [{"collection": "usage", "op": "remove", "id": hour}
               for hour in sorted(old.keys() - new.keys(), key=int)]
    changes += [{"collection": "usage", "op": "upsert", "id": hour, "record": new[hour]}
                for hour in _recent_hours(new)
                if old.get(hour) is not new[hour] and old.get(hour) != new[hour]]
    return changes


def _raft_news(new: Record, old: Record) -> bool:
    """Leader, term, quorum or members changed (not the commit index, which every write moves)."""
    return any(new[k] != old[k] for k in ("leader", "term", "has_quorum", "members", "ready"))


def _model(view: StateView, name: str) -> Record:
    summary = model_summary(view, name)
    summary.pop("instances")                        # sent as their own collection
    return summary


def _key(record: Record) -> Record:
    return {k: v for k, v in record.items() if k != "hash"}


def _reading(node: Record, reply: Record | str | None) -> Record:
    """One node's entry in a `telemetry` event."""
    if isinstance(reply, str):
        return {"ok": False, "error": reply}
    latest = reply.get("latest") if isinstance(reply, dict) else None
    if not isinstance(latest, dict):
        # No sampler there: what the node registered (its totals; readings of that moment).
        inventory = node.get("inventory") or {}
        latest = {"time": None, "cpu_percent": None, "gpus": inventory.get("gpus", []),
                  "memory_total_bytes": inventory.get("memory_total_bytes"),
                  "memory_available_bytes": inventory.get("memory_available_bytes")}
        source = "inventory"
    else:
        source = "telemetry"
    return {"ok": True, "source": source, "time": latest.get("time"),
            "cpu_percent": latest.get("cpu_percent"), "gpus": latest.get("gpus") or [],
            "memory_total_bytes": latest.get("memory_total_bytes"),
            "memory_available_bytes": latest.get("memory_available_bytes"),
            "error": latest.get("error")}


_GPU_READINGS = ("index", "utilization_percent", "memory_used_bytes", "temperature_c",
                 "power_w")


def _compact(sample: Record) -> Record:
    return {"time": sample.get("time"), "cpu_percent": sample.get("cpu_percent"),
            "memory_available_bytes": sample.get("memory_available_bytes"),
            "gpus": [{k: g.get(k) for k in _GPU_READINGS} for g in sample.get("gpus") or []]}
