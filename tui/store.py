"""What the console knows of the cluster: plain data, fed by the `/api/events` stream.

`ClusterModel.apply(event, data)` takes one stream event and returns the topics it changed
("nodes", "models", "instances", "api_keys", "raft", "telemetry", "log"); the app bumps one
counter per topic and each view redraws only what it shows. Nothing here touches the UI or
the network, so it is tested on its own.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

__all__ = ["ClusterModel", "GpuRef", "Series", "HISTORY_SAMPLES"]

Record = dict[str, Any]

HISTORY_SAMPLES = 600          # ten minutes at 1 Hz, per GPU and metric
LOG_LINES = 500
METRICS = ("util", "mem", "temp", "power")
COLLECTIONS = ("nodes", "models", "instances", "api_keys", "users")
_KEY_FIELD = {"nodes": "id", "models": "name", "instances": "id", "api_keys": "id",
              "users": "id"}
USAGE_HOURS = 2                # the stream sends the current and the previous hour
RATE_WINDOW_S = 60.0           # "rates now": over the last minute


@dataclass
class Series:
    """A metric's recent values (None where there was no reading: a gap in the chart)."""

    util: deque = field(default_factory=lambda: deque(maxlen=HISTORY_SAMPLES))
    mem: deque = field(default_factory=lambda: deque(maxlen=HISTORY_SAMPLES))
    temp: deque = field(default_factory=lambda: deque(maxlen=HISTORY_SAMPLES))
    power: deque = field(default_factory=lambda: deque(maxlen=HISTORY_SAMPLES))

    def append(self, util: float | None, mem: float | None, temp: float | None,
               power: float | None) -> None:
        self.util.append(util)
        self.mem.append(mem)
        self.temp.append(temp)
        self.power.append(power)


@dataclass(frozen=True)
class GpuRef:
    node_id: str
    index: int | None          # None: the node as a whole (its CPU and RAM if it has no GPU)


class ClusterModel:
    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.node_id: str | None = None          # the node the console is attached to
        self.version = 0
        self.raft: Record = {}
        self.nodes: dict[str, Record] = {}
        self.models: dict[str, Record] = {}
        self.instances: dict[str, Record] = {}
        self.api_keys: dict[str, Record] = {}
        self.users: dict[str, Record] = {}
        self.has_users = False                   # the node's state has users at all
        # Metered usage: the recent hours' rows as replicated, counters that only grow (what
        # each (model, key) was served since the console attached), and marks of them in
        # time, from which rates follow; a 1 Hz series of the totals' rates for the charts.
        self.usage: dict[str, dict[str, Record]] = {}
        self.has_usage = False
        self.usage_counted: dict[tuple[str, str], tuple[int, int, int]] = {}
        self.usage_marks: deque[tuple[float, dict]] = deque(maxlen=256)
        self.usage_rpm: deque[float | None] = deque(maxlen=HISTORY_SAMPLES)
        self.usage_tps: deque[float | None] = deque(maxlen=HISTORY_SAMPLES)
        self.telemetry: dict[str, Record] = {}   # node id -> latest reading
        self.telemetry_time: float | None = None
        self.series: dict[GpuRef, Series] = {}
        self.log: deque[tuple[float, str]] = deque(maxlen=LOG_LINES)
        self.log_total = 0                       # lines ever noted (the deque forgets)
        self.ready = False                       # a snapshot has arrived

    # --- the stream ------------------------------------------------------------------------

    def apply(self, event: str, data: Any) -> set[str]:
        handler = getattr(self, f"_on_{event}", None)
        return handler(data) if handler is not None else set()

    def _on_snapshot(self, data: Record) -> set[str]:
        self.node_id = data["node_id"]
        self.version = data.get("version", 0)
        self.raft = data.get("raft") or {}
        for name in COLLECTIONS:
            key = _KEY_FIELD[name]
            setattr(self, name, {r[key]: r for r in data.get(name, [])})
        self.has_users = "users" in data
        self.has_usage = "usage" in data
        self.usage = dict(data.get("usage") or {})
        self.usage_counted = {}
        self.usage_marks.clear()
        self.usage_marks.append((self.clock(), {}))   # the baseline: nothing counted yet
        self.ready = True
        self._note(f"attached to node {self._node_label(self.node_id)}")
        return {*COLLECTIONS, "usage", "raft", "log", "telemetry"}

    def _on_change(self, data: Record) -> set[str]:
        topics: set[str] = set()
        for change in data.get("changes", []):
            if change["collection"] == "usage":
                self._fold_usage(change["id"], change.get("record") if change["op"] == "upsert"
                                 else None)
                topics.add("usage")
                continue
            collection = getattr(self, change["collection"], None)
            if change["collection"] not in COLLECTIONS or collection is None:
                continue
            if change["op"] == "remove":
                collection.pop(change["id"], None)
            else:
                collection[change["id"]] = change["record"]
            topics.add(change["collection"])
        now = self.clock()
        for line in data.get("log", []):
            self._note(line, now)
            topics.add("log")
        self.version = data.get("version", self.version)
        return topics

    def _on_raft(self, data: Record) -> set[str]:
        old_leader = self.raft.get("leader")
        self.raft = data
        if data.get("leader") != old_leader:
            leader = self.leader_node_id()
            who = self._node_label(leader) if leader else data.get("leader") or "nobody"
            self._note(f"Raft leader is now {who} (term {data.get('term')})")
            return {"raft", "nodes", "log"}
        return {"raft", "nodes"}

    def _on_telemetry(self, data: Record) -> set[str]:
        topics = {"telemetry"}
        if self.has_usage:                       # the rate charts tick with the telemetry
            rpm, tps = self.total_rates()
            self.usage_rpm.append(rpm)
            self.usage_tps.append(tps)
        self.telemetry_time = data.get("t")
        for node_id, reading in data.get("nodes", {}).items():
            was_ok = self.telemetry.get(node_id, {}).get("ok", True)
            self.telemetry[node_id] = reading
            if was_ok != reading.get("ok", False):
                topics |= {"nodes", "log"}
                self._note(f"node {self._node_label(node_id)} " + (
                    "answers again" if reading.get("ok") else
                    f"does not answer: {reading.get('error')}"))
            self._record(node_id, reading)
        return topics

    def _on_telemetry_history(self, data: Record) -> set[str]:
        for node_id, samples in data.get("nodes", {}).items():
            # A reconnect sends the window again: it replaces what this node's charts held.
            for ref in [r for r in self.series if r.node_id == node_id]:
                del self.series[ref]
            totals = self._gpu_totals(node_id)
            ram_total = (self.nodes.get(node_id, {}).get("inventory") or {}).get(
                "memory_total_bytes")
            for sample in samples:
                gpus = [{**g, "memory_total_bytes": totals.get(g.get("index"))}
                        for g in sample.get("gpus", [])]
                self._record(node_id, {"ok": True, "gpus": gpus,
                                       "cpu_percent": sample.get("cpu_percent"),
                                       "memory_total_bytes": ram_total,
                                       "memory_available_bytes":
                                           sample.get("memory_available_bytes")})
        return {"telemetry"}

    def _fold_usage(self, hour: str, rows: dict[str, Record] | None) -> None:
        """One hour's rows replaced: what grew since the last time goes into the counters."""
        previous = self.usage.get(hour, {})
        for row_id, row in (rows or {}).items():
            before = previous.get(row_id, {})
            ident = (str(row.get("model")), str(row.get("key")))
            requests, tokens, errors = self.usage_counted.get(ident, (0, 0, 0))
            self.usage_counted[ident] = (
                requests + max(0, row.get("requests", 0) - before.get("requests", 0)),
                tokens + max(0, _tokens(row) - _tokens(before)),
                errors + max(0, row.get("errors", 0) - before.get("errors", 0)))
        if rows is None:
            self.usage.pop(hour, None)
        else:
            self.usage[hour] = rows
        for old in sorted(self.usage, key=int)[:-USAGE_HOURS]:
            del self.usage[old]
        self.usage_marks.append((self.clock(), dict(self.usage_counted)))

    def usage_rates(self) -> dict[tuple[str, str], tuple[float, float]]:
        """(requests per minute, tokens per second) of each (model, key) over the last
        minute, or as long as the console has watched if that is shorter."""
        now = self.clock()
        if not self.usage_marks:
            return {}
        then_t, then = self.usage_marks[0]
        for t, counted in self.usage_marks:
            if t <= now - RATE_WINDOW_S:
                then_t, then = t, counted
        seconds = max(1.0, now - then_t)
        rates = {}
        for ident, (requests, tokens, _) in self.usage_counted.items():
            before = then.get(ident, (0, 0, 0))
            rates[ident] = (60 * (requests - before[0]) / seconds, (tokens - before[1]) / seconds)
        return rates

    def total_rates(self) -> tuple[float | None, float | None]:
        rates = self.usage_rates()
        if not rates:
            return (0.0, 0.0) if self.has_usage else (None, None)
        return sum(r for r, _ in rates.values()), sum(t for _, t in rates.values())

    def _note(self, line: str, when: float | None = None) -> None:
        self.log.append((self.clock() if when is None else when, line))
        self.log_total += 1

    def new_log_lines(self, seen_total: int) -> list[tuple[float, str]]:
        """Lines noted after the first `seen_total` (as many as are still kept)."""
        count = min(self.log_total - seen_total, len(self.log))
        return list(self.log)[len(self.log) - count:] if count > 0 else []

    def _record(self, node_id: str, reading: Record) -> None:
        gpus = reading.get("gpus") or [] if reading.get("ok") else []
        for gpu in gpus:
            self._series(GpuRef(node_id, gpu.get("index"))).append(
                gpu.get("utilization_percent"), _percent(gpu.get("memory_used_bytes"),
                                                         gpu.get("memory_total_bytes")),
                gpu.get("temperature_c"), gpu.get("power_w"))
        whole = self._series(GpuRef(node_id, None))
        if not reading.get("ok"):
            whole.append(None, None, None, None)
            for ref, series in self.series.items():
                if ref.node_id == node_id and ref.index is not None:
                    series.append(None, None, None, None)
        elif gpus:
            whole.append(_mean(g.get("utilization_percent") for g in gpus),
                         _percent(_sum(g.get("memory_used_bytes") for g in gpus),
                                  _sum(g.get("memory_total_bytes") for g in gpus)),
                         _max(g.get("temperature_c") for g in gpus),
                         _sum(g.get("power_w") for g in gpus))
        else:
            total, available = (reading.get("memory_total_bytes"),
                                reading.get("memory_available_bytes"))
            used = total - available if total is not None and available is not None else None
            whole.append(reading.get("cpu_percent"), _percent(used, total), None, None)

    def _series(self, ref: GpuRef) -> Series:
        series = self.series.get(ref)
        if series is None:
            series = self.series[ref] = Series()
        return series

    def _gpu_totals(self, node_id: str) -> dict[int, int]:
        reading = self.telemetry.get(node_id) or {}
        gpus = reading.get("gpus") or (self.nodes.get(node_id, {}).get("inventory") or {}).get(
            "gpus", [])
        return {g["index"]: g.get("memory_total_bytes") for g in gpus}

    # --- questions the views ask -----------------------------------------------------------

    def leader_node_id(self) -> str | None:
        leader = self.raft.get("leader")
        return next((n["id"] for n in self.nodes.values() if n.get("raft_address") == leader),
                    None)

    def role(self, node: Record) -> str:
        address = node.get("raft_address")
        if address and address == self.raft.get("leader"):
            return "leader"
        if address in (self.raft.get("members") or ()):
            return "follower"
        return "-"

    def node_state(self, node_id: str) -> str:
        """ready, draining, unreachable or stopped: the replicated status (and the admin's
        drain), or unreachable at once when the node stops answering this console's node
        (the leader's liveness marks it a few seconds later)."""
        node = self.nodes.get(node_id, {})
        status = node.get("status", "unknown")
        reading = self.telemetry.get(node_id)
        if reading is not None and not reading.get("ok") and status != "stopped":
            return "unreachable"
        if node.get("draining") and status != "unreachable":
            return "draining"
        return status

    def gpus_of(self, node_id: str) -> list[Record]:
        """The node's GPUs: live readings when there are any, else what it registered."""
        reading = self.telemetry.get(node_id) or {}
        if reading.get("ok") and reading.get("gpus"):
            return reading["gpus"]
        return list((self.nodes.get(node_id, {}).get("inventory") or {}).get("gpus", []))

    def instances_on(self, node_id: str, gpu_index: int | None = None) -> list[Record]:
        found = []
        for instance in self.instances.values():
            if instance.get("node_id") != node_id:
                continue
            indices = (instance.get("allocation") or {}).get("gpu_indices") or []
            if gpu_index is None or gpu_index in indices:
                found.append(instance)
        return sorted(found, key=lambda i: i["id"])

    def node_load(self, node_id: str) -> float | None:
        series = self.series.get(GpuRef(node_id, None))
        return series.util[-1] if series and series.util else None

    def node_memory(self, node_id: str) -> tuple[int | None, int | None]:
        """(used, total) bytes of the node's RAM, from the latest reading or the inventory."""
        reading = self.telemetry.get(node_id) or {}
        inventory = self.nodes.get(node_id, {}).get("inventory") or {}
        total = reading.get("memory_total_bytes") or inventory.get("memory_total_bytes")
        available = reading.get("memory_available_bytes")
        if available is None:
            available = inventory.get("memory_available_bytes")
        if total is None or available is None:
            return None, total
        return total - available, total

    def known_nodes(self) -> list[tuple[str, str, str]]:
        """(id, name, API URL) of every node the console knows: the attached one first,
        stopped ones last."""
        nodes = sorted(self.nodes.values(),
                       key=lambda n: (n["id"] != self.node_id, n.get("status") == "stopped",
                                      n.get("name", "")))
        return [(n["id"], n.get("name", n["id"]), n["api_url"])
                for n in nodes if n.get("api_url")]

    def _node_label(self, node_id: str | None) -> str:
        node = self.nodes.get(node_id or "", {})
        return node.get("name") or node_id or "?"


def _tokens(row: Record) -> int:
    return int(row.get("prompt_tokens", 0)) + int(row.get("completion_tokens", 0))


def _percent(used: Any, total: Any) -> float | None:
    if used is None or not total:
        return None
    return 100.0 * used / total


def _clean(values: Iterable[Any]) -> list[float]:
    return [v for v in values if isinstance(v, (int, float))]


def _mean(values: Iterable[Any]) -> float | None:
    found = _clean(values)
    return sum(found) / len(found) if found else None


def _sum(values: Iterable[Any]) -> float | None:
    found = _clean(values)
    return sum(found) if found else None


def _max(values: Iterable[Any]) -> float | None:
    found = _clean(values)
    return max(found) if found else None
