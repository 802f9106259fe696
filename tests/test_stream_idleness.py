"""Scale to zero counts idleness from the end of the last request, and never stops an
instance while requests are in flight.

A real single-node Raft store, the daemon's own HTTP app (gateway and activation hook) and
the leader's reconciler; the engine is a stand-in OpenAI server that streams slowly, one
event every `gap` seconds, so a stream lasts longer than the model's idle timeout (a tiny
llama.cpp model answers too fast to outlast any timeout). The instance record is the one
the reconciler stops when the model goes idle.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import aiohttp
import pytest
from aiohttp import web

from gateway_fixtures import bootstrap
from inprocess import InProcessNode, instance_record
from tinymodels import write_tiny_gguf

from gpumesh.mesh.deployments import build_model_record
from gpumesh.mesh.reconciler import ReplicaReconciler
from gpumesh.mesh.scheduler import Scheduler

NODE = "n1"
IDLE_S = 1.0
EVENTS, GAP_S = 8, 0.5           # a 4 s stream: four idle timeouts long


def slow_engine() -> web.Application:
    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for n in range(int(body.get("events", EVENTS))):
            await asyncio.sleep(float(body.get("gap", GAP_S)))
            chunk = {"id": "chatcmpl-slow", "object": "chat.completion.chunk",
                     "choices": [{"index": 0, "delta": {"content": f"{n} "},
                                  "finish_reason": None}]}
            await response.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    return app


@contextlib.contextmanager
def lazy_model_node(tmp_path: Path) -> Iterator[tuple[InProcessNode, str, int, Callable[[], None]]]:
    """A node serving the slow engine, with the on-demand model 'lazy' (no instance yet):
    (node, admin key, the engine's port, start_reconciler). start_reconciler() runs the
    leader's reconciler on the node's loop; it and the node are stopped on leaving."""
    node = InProcessNode(tmp_path / "node", (NODE,))
    node.start()
    tasks: list[asyncio.Task] = []

    def start_reconciler() -> None:
        async def start() -> None:
            reconciler = ReplicaReconciler(node.store, Scheduler(reserved_memory_bytes=0))
            tasks.append(asyncio.create_task(reconciler.run()))
        node.call(start())

    try:
        key = bootstrap(node)
        port = node.serve(slow_engine())
        record = build_model_record({"name": "lazy", "source": str(write_tiny_gguf(
            tmp_path / "tiny.gguf")), "min_replicas": 0, "idle_timeout_s": IDLE_S})
        node.submit({"op": "create_model", "model": record})
        yield node, key, port, start_reconciler
    finally:
        async def stop() -> None:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        node.call(stop())
        node.stop()


@pytest.fixture()
def node(tmp_path: Path) -> Iterator[tuple[InProcessNode, str]]:
    with lazy_model_node(tmp_path) as (node, key, port, start_reconciler):
        node.submit({"op": "record_activity", "models": {"lazy": time.time()}})
        node.submit({"op": "create_instance",
                     "instance": instance_record("lazy-1", "lazy", "running", NODE, port=port)})
        start_reconciler()
        yield node, key


def test_a_stream_longer_than_the_idle_timeout_keeps_its_instance(node) -> None:
    node, key = node
    seen: list[dict[str, Any]] = []

    async def stream() -> float:
        async with aiohttp.ClientSession() as session:
            async with session.post(node.url + "/v1/chat/completions", json={
                    "model": "lazy", "stream": True,
                    "messages": [{"role": "user", "content": "take your time"}]},
                    headers={"Authorization": f"Bearer {key}"}) as reply:
                assert reply.status == 200, await reply.text()
                async for line in reply.content:
                    if line.startswith(b"data: {"):
                        seen.append({"instances": set(node.store.view.instances),
                                     "busy": dict(node.store.view.models["lazy"]
                                                  .get("busy") or {})})
        return time.time()

    started = time.time()
    ended = node.call(stream(), timeout=60)
    assert ended - started >= EVENTS * GAP_S > 3 * IDLE_S
    assert len(seen) == EVENTS
    # Through the whole stream (four idle timeouts) the instance stayed, and the model was
    # marked busy by this node.
    assert all(s["instances"] == {"lazy-1"} for s in seen), seen
    assert any(NODE in s["busy"] for s in seen), seen
    # Idleness counts from the stream's end: the model's last request is its end ...
    deadline = time.monotonic() + 30
    while (node.store.view.models["lazy"].get("last_request") or 0) < ended - 0.5:
        assert time.monotonic() < deadline, node.store.view.models["lazy"]
        time.sleep(0.05)
    assert NODE not in (node.store.view.models["lazy"].get("busy") or {})
    # ... and then, idle, the instance is stopped.
    while "lazy-1" in node.store.view.instances:
        assert time.monotonic() < deadline, node.store.view.models["lazy"]
        time.sleep(0.05)


def test_a_request_waiting_for_a_wake_keeps_the_model_wanted_past_its_idle_timeout(
        tmp_path: Path) -> None:
    """The leader may decide late (under load): a request still waiting for the woken model
    keeps it busy, so an instance is placed even after the idle timeout has passed since the
    request arrived (it used to be found idle again: nothing placed, a 503 after the whole
    wake timeout)."""
    with lazy_model_node(tmp_path) as (node, key, port, start_reconciler):
        node.submit({"op": "upsert_node", "node": {
            "id": NODE, "name": NODE, "status": "ready",
            "backends": {"llama.cpp": {"runs_on_cpu": True, "gpu_vendors": []}},
            "inventory": {"cpu_cores": 2, "memory_total_bytes": 8 << 30,
                          "memory_available_bytes": 8 << 30, "gpus": [], "probe": "test"}}})

        async def ask() -> int:
            async with aiohttp.ClientSession() as session:
                async with session.post(node.url + "/v1/chat/completions", json={
                        "model": "lazy", "events": 1, "gap": 0,
                        "messages": [{"role": "user", "content": "wake up"}]},
                        headers={"Authorization": f"Bearer {key}"}) as reply:
                    await reply.read()
                    return reply.status
        waiting = asyncio.run_coroutine_threadsafe(ask(), node.loop)
        deadline = time.monotonic() + 30
        while "last_request" not in node.store.view.models["lazy"]:     # the wake arrived
            assert time.monotonic() < deadline and not waiting.done(), waiting
            time.sleep(0.05)
        time.sleep(3 * IDLE_S)          # the leader comes late: the request is older than that
        assert not waiting.done()
        assert NODE in (node.store.view.models["lazy"].get("busy") or {})
        start_reconciler()
        while not node.store.view.instances:                  # placed for the waiting request
            assert time.monotonic() < deadline, node.store.view.models["lazy"]
            time.sleep(0.05)
        (instance_id,) = node.store.view.instances            # the agent's part: it runs
        node.submit({"op": "update_instance", "id": instance_id,
                     "changes": {"state": "running", "port": port}})
        assert waiting.result(30) == 200
