"""A simulated cluster: a real HTTP server that speaks the management API's event stream with
recorded-shape data, for the console's snapshot tests and its benchmark.

The records have the daemon's shapes (node, model summary, instance, telemetry sample, as
`/api/events` sends them); the readings are a deterministic function of a step counter, so
a snapshot is the same on every run. `live=False` sends the snapshot and a fixed history and
then only keep-alive comments (stable pictures); `live=True` adds a 1 Hz telemetry tick, as a
real node does (the benchmark).
"""

from __future__ import annotations

import asyncio
import json
import math
import threading
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestServer

FIXED_TIME = 1_767_225_600.0          # 2026-01-01 00:00 UTC: every recorded time is near it
ADMIN_KEY = "gm-sim-secret"
GPU_MEMORY = 80 << 30


class SimCluster:
    def __init__(self, nodes: int = 3, gpus: int = 2, *, live: bool = False,
                 history: int = 120, models: int = 3) -> None:
        self.node_count = nodes
        self.gpu_count = gpus
        self.live = live
        self.history = history
        self.model_count = models
        self.step = history
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="sim-cluster",
                                       daemon=True)
        self.server: TestServer | None = None
        self.streams = 0                       # event streams served so far

    # --- lifecycle ---------------------------------------------------------------------------

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.port}"

    def start(self) -> "SimCluster":
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)
        return self

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_get("/api/health", self._health)
        app.router.add_get("/api/status", self._status)
        app.router.add_get("/api/events", self._events)
        app.router.add_get("/api/instances/{id}/logs", self._logs)
        self.server = TestServer(app, host="127.0.0.1")
        await self.server.start_server()

    async def _stop(self) -> None:
        assert self.server is not None
        await self.server.close()

    # --- the records ---------------------------------------------------------------------------

    def node_id(self, n: int) -> str:
        return f"{n:02d}{'abcdef0123'[n % 10]}e5d4c3b2a1"[:12]

    def nodes(self) -> list[dict[str, Any]]:
        return [{"id": self.node_id(n), "name": f"gpu-node-{n:02d}", "status": "ready",
                 "api_url": f"http://10.0.0.{10 + n}:8470",
                 "raft_address": f"10.0.0.{10 + n}:8471", "version": "0.1.0",
                 "inventory": {"cpu_cores": 64, "memory_total_bytes": 512 << 30,
                               "memory_available_bytes": 400 << 30, "probe": "nvidia",
                               "gpus": [self.gpu(n, g, self.step) for g in range(self.gpu_count)]},
                 "backends": {"llama.cpp": {"version": "b4500", "runs_on_cpu": True,
                                            "gpu_vendors": ["nvidia"]}},
                 "updated": FIXED_TIME}
                for n in range(self.node_count)]

    def gpu(self, n: int, g: int, step: int) -> dict[str, Any]:
        phase = (n * self.gpu_count + g) * 0.7
        util = 50 + 45 * math.sin(step / 9 + phase)
        return {"index": g, "vendor": "nvidia", "name": "NVIDIA H200",
                "uuid": f"GPU-{n:02d}{g:02d}-sim", "memory_total_bytes": GPU_MEMORY,
                "memory_used_bytes": int(GPU_MEMORY * (0.35 + 0.3 * math.sin(step / 23 + phase)
                                                       ** 2)),
                "utilization_percent": round(util, 1),
                "temperature_c": round(40 + util * 0.35, 1),
                "power_w": round(120 + util * 5.5, 1)}

    def models(self) -> list[dict[str, Any]]:
        names = ["llama-3.1-8b", "qwen2.5-72b", "bge-m3", "mistral-7b", "phi-4"]
        found = []
        for m in range(self.model_count):
            replicas = (m % 3) + 1
            ready = replicas if m != 1 else replicas - 1
            found.append({
                "name": names[m % len(names)] + ("" if m < len(names) else f"-{m}"),
                "source": {"kind": "huggingface", "repo": f"org/{names[m % len(names)]}-GGUF",
                           "file": "model-Q4_K_M.gguf"},
                "format": "gguf", "backend": "llama.cpp", "replicas": replicas,
                "kind": "embedding" if m == 2 else "llm", "context_length": 8192,
                "args": [], "estimate": {"total_bytes": (6 + 30 * (m == 1)) << 30,
                                         "weights_bytes": (5 + 28 * (m == 1)) << 30,
                                         "kv_cache_bytes": 1 << 30,
                                         "by_device": {"gpu": (6 + 30 * (m == 1)) << 30,
                                                       "cpu": (7 + 31 * (m == 1)) << 30}},
                "created": FIXED_TIME - 86400, "schedule_error":
                    "needs 36.0 GiB of GPU memory; gpu-node-02 has 20.1 GiB free" if m == 1
                    else None,
                "status": "running" if ready == replicas else "deploying",
                "ready_replicas": ready})
        return found

    def instances(self) -> list[dict[str, Any]]:
        found = []
        for m, model in enumerate(self.models()):
            for r in range(model["ready_replicas"]):
                n = (m + r) % self.node_count
                found.append({"id": f"{model['name'][:6]}-{r}{m}f3a", "model": model["name"],
                              "node_id": self.node_id(n), "state": "running",
                              "allocation": {"device": "gpu", "gpu_vendor": "nvidia",
                                             "gpu_indices": [r % self.gpu_count],
                                             "memory_bytes": model["estimate"]["total_bytes"]},
                              "port": 40100 + len(found), "pid": 1000 + len(found),
                              "reason": None, "restarts": m,
                              "created": FIXED_TIME - 7200, "updated": FIXED_TIME - 3600 * (r + 1)})
        return found

    def snapshot(self) -> dict[str, Any]:
        members = [n["raft_address"] for n in self.nodes()]
        return {"node_id": self.node_id(0), "version": 42,
                "raft": {"self_address": members[0], "leader": members[0], "is_leader": True,
                         "term": 3, "commit_index": 420, "last_applied": 420,
                         "has_quorum": True, "ready": True, "members": members},
                "nodes": self.nodes(), "models": self.models(), "instances": self.instances(),
                "api_keys": [{"id": "a1b2c3d4", "name": "admin", "role": "admin",
                              "created": FIXED_TIME - 86400}]}

    def telemetry(self, step: int) -> dict[str, Any]:
        return {"t": FIXED_TIME + step, "nodes": {
            self.node_id(n): {"ok": True, "source": "telemetry", "time": FIXED_TIME + step,
                              "cpu_percent": 20.0, "memory_total_bytes": 512 << 30,
                              "memory_available_bytes": 400 << 30, "error": None,
                              "gpus": [self.gpu(n, g, step) for g in range(self.gpu_count)]}
            for n in range(self.node_count)}}

    def history_event(self) -> dict[str, Any]:
        keep = ("index", "utilization_percent", "memory_used_bytes", "temperature_c", "power_w")
        return {"nodes": {self.node_id(n): [
            {"time": FIXED_TIME + s, "cpu_percent": 20.0, "memory_available_bytes": 400 << 30,
             "gpus": [{k: v for k, v in self.gpu(n, g, s).items() if k in keep}
                      for g in range(self.gpu_count)]}
            for s in range(self.history)] for n in range(self.node_count)}}

    # --- routes ------------------------------------------------------------------------------

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _status(self, request: web.Request) -> web.Response:
        return web.json_response({"node_id": self.node_id(0), "version": "0.1.0"})

    async def _events(self, request: web.Request) -> web.StreamResponse:
        if request.headers.get("Authorization") != f"Bearer {ADMIN_KEY}":
            return web.json_response({"error": {"message": "a valid API key is required",
                                                "type": "invalid_request_error",
                                                "param": None, "code": "invalid_api_key"}},
                                     status=401)
        self.streams += 1
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)

        async def send(event: str, data: Any) -> None:
            await response.write(f"event: {event}\ndata: {json.dumps(data)}\n\n".encode())

        try:
            await send("snapshot", self.snapshot())
            if float(request.query.get("history", "0")) > 0:
                await send("telemetry_history", self.history_event())
            while True:
                await asyncio.sleep(1.0)
                if self.live:
                    self.step += 1
                    await send("telemetry", self.telemetry(self.step))
                else:
                    await response.write(b": keep-alive\n\n")
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        return response

    async def _logs(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/plain"})
        await response.prepare(request)
        instance = request.match_info["id"]
        for i in range(5):
            await response.write(f"[sim] {instance}: log line {i}\n".encode())
        try:
            while True:
                await asyncio.sleep(3600)
        except asyncio.CancelledError:
            pass
        return response
