"""On-demand models end to end: scale to zero, start on the first request, LRU eviction.

One node in-process with every part that matters running for real: the Raft store, the
daemon's HTTP app (gateway + activation hook), the leader's reconciler and the node agent,
which starts real llama.cpp engines (xllamacpp) for a tiny model made here. Only the node's
record is written by the test, as a smaller machine: its RAM holds one model, not two, so
the second request has to evict the first.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any, Iterator

import aiohttp
import pytest

from gpumesh.backends.registry import describe_backends
from gpumesh.backends.versions import BackendVersions, backends_dir
from gpumesh.mesh.activation import WAKE_TIMEOUT_S
from gpumesh.mesh.agent import NodeAgent
from gpumesh.mesh.auth import ADMIN, new_api_key
from gpumesh.mesh.reconciler import ReplicaReconciler
from gpumesh.mesh.scheduler import Scheduler

from harness import pid_alive
from inprocess import InProcessNode, Reply, http_request
from tinymodels import write_tiny_gguf

NODE = "n1"
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


class OnDemandNode:
    def __init__(self, directory: Path) -> None:
        self.node = InProcessNode(directory / "node", (NODE,))
        self.directory = directory
        self.tasks: list[asyncio.Task] = []
        self.agent: NodeAgent | None = None

    def start(self) -> None:
        self.node.start()
        self.key, record = new_api_key("admin", ADMIN)
        self.node.submit({"op": "create_api_key", "key": record, "only_if_no_admin": True})
        self.node.call(self._start_parts())

    async def _start_parts(self) -> None:
        store = self.node.store
        self.agent = NodeAgent(node_id=NODE, store=store, session=self.node.session,
                               model_cache=self.directory / "cache",
                               log_dir=self.directory / "logs",
                               versions=BackendVersions(backends_dir(self.directory)))
        # An instance unasked-for this long may make room for another model (10 s in a
        # daemon; short here so the test need not wait).
        reconciler = ReplicaReconciler(store, Scheduler(reserved_memory_bytes=0),
                                       evict_idle_s=0.5)
        self.tasks = [asyncio.create_task(self.agent.run()),
                      asyncio.create_task(reconciler.run())]

    def stop(self) -> None:
        async def stop_parts() -> None:
            for task in self.tasks:
                task.cancel()
            await asyncio.gather(*self.tasks, return_exceptions=True)
            if self.agent is not None:
                await self.agent.stop()
        try:
            self.node.call(stop_parts())
        finally:
            self.node.stop()

    def api(self, method: str, path: str, body: Any = None, timeout: float = 60.0):
        return self.node.call(http_request(self.node.url + path, method, key=self.key,
                                           json_body=body), timeout=timeout)

    def chat(self, model: str) -> Reply:
        """A chat request; it may wait for an instance to start (up to the wake timeout)."""
        async def ask() -> Reply:
            timeout = aiohttp.ClientTimeout(total=WAKE_TIMEOUT_S + 30)
            async with aiohttp.ClientSession(timeout=timeout) as session:
                async with session.post(self.node.url + "/v1/chat/completions",
                                        json={"model": model, **CHAT},
                                        headers={"Authorization": f"Bearer {self.key}"}) as r:
                    return Reply(r.status, r.headers, await r.read())
        try:
            return self.node.call(ask(), timeout=WAKE_TIMEOUT_S + 60)
        except Exception as exc:       # say what the node was doing, not just "timed out"
            logs = {p.name: p.read_text(errors="replace")[-1500:]
                    for p in (self.directory / "logs").glob("*.log")}
            raise AssertionError(f"chat with {model} failed ({exc!r}); the model: "
                                 f"{self.model(model)}; engine logs: {logs}") from exc

    def register_node(self, ram: int) -> None:
        backends = {b["name"]: {"version": b["version"], "runs_on_cpu": b["runs_on_cpu"],
                                "gpu_vendors": b["gpu_vendors"]}
                    for b in describe_backends() if b["available"]}
        self.node.submit({"op": "upsert_node", "node": {
            "id": NODE, "name": "small-node", "status": "ready", "backends": backends,
            "inventory": {"cpu_cores": 2, "memory_total_bytes": ram,
                          "memory_available_bytes": ram, "gpus": [], "probe": "test"}}})

    def model(self, name: str) -> dict:
        reply = self.api("GET", f"/api/models/{name}")
        assert reply.status == 200, reply
        return reply.body

    def wait(self, what: str, check, timeout: float = 30.0) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if result := check():
                return result
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OnDemandNode]:
    directory = tmp_path_factory.mktemp("on-demand")
    model = write_tiny_gguf(directory / "tiny.gguf")
    on_demand = OnDemandNode(directory)
    try:
        on_demand.start()
        for name, idle in (("lazy", 2.0), ("a", 600.0), ("b", 600.0)):
            reply = on_demand.api("POST", "/api/models", {
                "source": str(model), "name": name, "min_replicas": 0, "idle_timeout_s": idle})
            assert reply.status == 201, reply
        size = on_demand.model("lazy")["estimate"]["by_device"]["cpu"]
        on_demand.register_node(ram=size * 3 // 2)          # one model fits, two do not
        yield on_demand
    finally:
        on_demand.stop()


def test_scaled_to_zero_until_the_first_request_then_back_to_zero(cluster: OnDemandNode):
    lazy = cluster.model("lazy")
    assert (lazy["status"], lazy["instances"]) == ("idle", [])
    started = time.monotonic()
    reply = cluster.chat("lazy")                  # waits while an instance starts
    assert reply.status == 200, reply
    assert reply.body["choices"][0]["message"]["role"] == "assistant"
    running = cluster.model("lazy")
    assert running["status"] == "running" and len(running["instances"]) == 1
    instance = running["instances"][0]
    assert instance["placement_reason"].startswith("binpack: the CPU of small-node")
    assert cluster.chat("lazy").status == 200     # a warm request
    # idle for 2 s: stopped, and the engine process is gone
    cluster.wait("lazy back at zero", lambda: cluster.model("lazy")["instances"] == [])
    assert cluster.model("lazy")["status"] == "idle"
    cluster.wait("the engine to exit", lambda: not pid_alive(instance["pid"]), 15)
    assert time.monotonic() - started < 60


def test_the_least_recently_used_idle_model_makes_room(cluster: OnDemandNode):
    assert cluster.chat("a").status == 200
    time.sleep(0.6)                               # a is idle now (and was used last)
    reply = cluster.chat("b")                     # only one fits: a is evicted for b
    assert reply.status == 200, reply
    a, b = cluster.model("a"), cluster.model("b")
    assert a["instances"] == [] and a["evicted_at"] is not None
    assert [i["state"] for i in b["instances"]] == ["running"]
    time.sleep(0.6)
    assert cluster.chat("a").status == 200        # and back: b, now idle, makes room
    assert cluster.model("b")["instances"] == []
    assert [i["state"] for i in cluster.model("a")["instances"]] == ["running"]


def test_a_model_that_cannot_start_answers_at_once_with_the_reason(cluster: OnDemandNode):
    source = cluster.model("lazy")["source"]["path"]
    reply = cluster.api("POST", "/api/models", {"source": source, "name": "gpu-only",
                                                "min_replicas": 0,
                                                "placement": {"device": "gpu"}})
    assert reply.status == 201, reply
    started = time.monotonic()
    refused = cluster.chat("gpu-only")
    assert refused.status == 503, refused
    assert "the deployment asks for GPUs only" in refused.error["message"]
    assert time.monotonic() - started < 30        # the leader's answer, not the wake timeout
