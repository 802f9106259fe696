"""Telemetry: this node's GPUs, CPU and memory, read once a second into a ring buffer.

Per-second readings are not replicated (ARCHITECTURE: Raft carries only what must survive).
One `TelemetrySampler` per node owns one thread that calls the node's probe every
`interval_s` and keeps the last `keep_s` seconds of samples. Everything else reads:

- in-process (the gateway's `/metrics`, `/api/events`): ``app.get(TELEMETRY)`` — absent when
  an app is served without the daemon's parts (in-process tests), so readers handle ``None``;
- over HTTP: ``GET /api/telemetry[?since=T]`` (admin key), this node only.

A sample is plain data, the same dict in memory and on the wire::

    {"time": 1733000000.0,          # wall clock, seconds (the ?since= cursor)
     "probe": "nvidia",              # which probe read it
     "cpu_cores": 16, "cpu_percent": 3.1,     # whole machine, over the last interval
     "memory_total_bytes": ..., "memory_available_bytes": ...,
     "gpus": [GpuDevice.to_dict(), ...],      # index, vendor, name, uuid, memory, util ...
     "error": None}                  # or the probe's one-line reason; then gpus == []

The sampler measures its own cost (its thread's CPU time), so the figure is there on every
node, not only in a benchmark: ``cost()`` and the endpoint's ``"sampler"`` field.
"""

from __future__ import annotations

import collections
import logging
import math
import threading
import time
from pathlib import Path
from typing import Any

from aiohttp import web

from .errors import openai_error
from .probes import Probe, ProbeError

__all__ = ["TELEMETRY", "TelemetrySampler", "add_telemetry_routes"]

log = logging.getLogger("gpumesh.telemetry")

DEFAULT_INTERVAL_S = 1.0
DEFAULT_KEEP_S = 600.0


class TelemetrySampler:
    """Reads ``probe`` every ``interval_s`` on its own thread; keeps ``keep_s`` of samples.

    ``start()`` and ``stop()`` are called by the daemon's telemetry part (``stop`` joins the
    thread); the read methods may be called from any thread, before, during or after.
    """

    def __init__(self, *, interval_s: float = DEFAULT_INTERVAL_S, keep_s: float = DEFAULT_KEEP_S,
                 proc_root: str | Path = "/") -> None:
        if interval_s <= 0 or keep_s < interval_s:
            raise ValueError("telemetry needs interval_s > 0 and keep_s >= interval_s")
        self.interval_s = interval_s
        self.keep_s = keep_s
        self._ring: collections.deque[dict[str, Any]] = collections.deque(
            maxlen=math.ceil(keep_s / interval_s))
        self._lock = threading.Lock()          # the ring and the cost counters
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._probe: Probe | None = None
        self._cpu = _CpuTimes(Path(proc_root) / "proc" / "stat")
        self._started_at: float | None = None
        self._thread_cpu_s = 0.0
        self._samples_taken = 0
        self._failing = False

    # --- lifecycle -------------------------------------------------------------------------

    def start(self, probe: Probe) -> None:
        if self._thread is not None:
            raise RuntimeError("the telemetry sampler is already started")
        self._probe = probe
        self._stop.clear()
        self._started_at = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="gpumesh-telemetry", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop sampling and join the thread (a probe read in flight is waited for)."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._stop.set()
        thread.join(timeout)
        if thread.is_alive():
            log.warning("the telemetry thread did not stop within %.0f s (a probe read hangs)",
                        timeout)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # --- reads -----------------------------------------------------------------------------

    def latest(self) -> dict[str, Any] | None:
        with self._lock:
            return self._ring[-1] if self._ring else None

    def history(self, seconds: float | None = None) -> list[dict[str, Any]]:
        """Samples of the last ``seconds`` (all kept ones for None), oldest first."""
        with self._lock:
            samples = list(self._ring)
        if seconds is None or not samples:
            return samples
        cutoff = samples[-1]["time"] - seconds
        return [s for s in samples if s["time"] >= cutoff]

    def since(self, t: float) -> list[dict[str, Any]]:
        """Samples taken after wall-clock time ``t``, oldest first (a polling cursor)."""
        with self._lock:
            samples = list(self._ring)
        return _after(samples, t)

    def gpu_memory_used(self) -> list[dict[str, int]] | None:
        """Each GPU's used memory in the latest sample, for the node's heartbeat: what other
        programs hold reaches the scheduler within seconds. None when there is no good sample
        (the heartbeat then leaves the last known figures as they are)."""
        sample = self.latest()
        if sample is None or sample["error"] is not None:
            return None
        return [{"index": g["index"], "memory_used_bytes": g["memory_used_bytes"]}
                for g in sample["gpus"]]

    def cost(self) -> dict[str, Any]:
        """What sampling has cost so far: its thread's CPU time against the time it ran."""
        with self._lock:
            cpu_s, taken = self._thread_cpu_s, self._samples_taken
        ran_s = 0.0 if self._started_at is None else time.monotonic() - self._started_at
        return {"samples": taken, "thread_cpu_s": round(cpu_s, 6), "running_s": round(ran_s, 3),
                "cpu_ms_per_sample": round(1000 * cpu_s / taken, 4) if taken else None,
                "core_percent": round(100 * cpu_s / ran_s, 5) if ran_s > 0 else None}

    # --- the thread ------------------------------------------------------------------------

    def _run(self) -> None:
        # A fixed schedule (not "sleep interval after each read") so samples stay 1 s apart;
        # a read slower than the interval pushes the schedule back instead of bursting.
        next_at = time.monotonic()
        while True:
            sample = self._sample()
            with self._lock:
                self._ring.append(sample)
                self._samples_taken += 1
                # This thread does nothing but sample: its CPU time is the whole cost.
                self._thread_cpu_s = time.thread_time()
            next_at += self.interval_s
            now = time.monotonic()
            if next_at < now:
                next_at = now
            if self._stop.wait(next_at - now):
                return

    def _sample(self) -> dict[str, Any]:
        assert self._probe is not None
        now = time.time()
        cpu_percent = self._cpu.percent()
        try:
            inventory = self._probe.inventory()
        except ProbeError as exc:
            if not self._failing:
                log.warning("telemetry: the %s probe failed: %s", self._probe.name, exc)
                self._failing = True
            return {"time": now, "probe": self._probe.name, "cpu_cores": None,
                    "cpu_percent": cpu_percent, "memory_total_bytes": None,
                    "memory_available_bytes": None, "gpus": [], "error": str(exc)}
        if self._failing:
            log.info("telemetry: the %s probe reads again", self._probe.name)
            self._failing = False
        return {"time": now, "probe": inventory.probe, "cpu_cores": inventory.cpu_cores,
                "cpu_percent": cpu_percent,
                "memory_total_bytes": inventory.memory_total_bytes,
                "memory_available_bytes": inventory.memory_available_bytes,
                "gpus": [gpu.to_dict() for gpu in inventory.gpus], "error": None}


def _after(samples: list[dict[str, Any]], t: float) -> list[dict[str, Any]]:
    # Samples are in time order; the ring is small (600), a scan from the end is enough.
    start = len(samples)
    while start > 0 and samples[start - 1]["time"] > t:
        start -= 1
    return samples[start:]


class _CpuTimes:
    """The machine's CPU utilisation between two reads of /proc/stat's first line."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._last: tuple[int, int] | None = None

    def percent(self) -> float | None:
        try:
            with open(self._path, "rb") as f:
                fields = f.readline().split()
        except OSError:
            return None                       # not Linux: no figure rather than a made-up one
        if not fields or fields[0] != b"cpu":
            return None
        values = [int(v) for v in fields[1:]]
        # user nice system idle iowait irq softirq steal (guest is already in user)
        idle = values[3] + (values[4] if len(values) > 4 else 0)
        total = sum(values[:8])
        last, self._last = self._last, (idle, total)
        if last is None or total <= last[1]:
            return None
        busy = (total - last[1]) - (idle - last[0])
        return round(100.0 * busy / (total - last[1]), 1)


def add_telemetry_routes(app: web.Application, node_id: str) -> None:
    """``GET /api/telemetry[?since=T]``: this node's samples after T (all kept ones without
    it), the latest sample, and what sampling costs. 503 where no sampler runs."""

    async def telemetry(request: web.Request) -> web.Response:
        sampler = request.app.get(TELEMETRY)
        if sampler is None or not sampler.running:
            return openai_error(503, "telemetry is not running on this node",
                                code="telemetry_unavailable")
        raw = request.query.get("since")
        try:
            since = float(raw) if raw is not None else None
        except ValueError:
            since = None
        if raw is not None and (since is None or not math.isfinite(since)):
            return openai_error(400, f"since must be a time in seconds (Unix epoch), got {raw!r}",
                                param="since")
        samples = sampler.history() if since is None else sampler.since(since)
        return web.json_response({
            "node_id": node_id, "interval_s": sampler.interval_s, "keep_s": sampler.keep_s,
            "latest": sampler.latest(), "samples": samples, "sampler": sampler.cost()})

    app.router.add_get("/api/telemetry", telemetry)


TELEMETRY = web.AppKey("telemetry", TelemetrySampler)
