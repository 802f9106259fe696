"""`GET /api/events` (mesh/api_events.py) over real HTTP, against a real ClusterStore.

Two HTTP apps share one single-node Raft store (as the nodes of a cluster share one
replicated state); the node records point at them, and at a third address where nothing
listens. The stream is read with the console's own client (gpumesh.tui.client), so these
tests pin the contract both sides rely on.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from inprocess import InProcessNode, instance_record
from tinymodels import write_tiny_gguf

from harness import free_port
from gpumesh.mesh.api_events import state_changes
from gpumesh.mesh.auth import ADMIN, USER, new_api_key
from gpumesh.mesh.commands import empty_state
from gpumesh.mesh.deployments import build_model_record
from gpumesh.mesh.replicated import StateView
from gpumesh.tui.client import ApiError, NodeClient

NODES = ("node-ev-a", "node-ev-b")


def node_record(node_id: str, url: str, status: str = "ready") -> dict[str, Any]:
    gpu = {"index": 0, "vendor": "nvidia", "name": "Test GPU", "uuid": f"GPU-{node_id}",
           "memory_total_bytes": 8 << 30, "memory_used_bytes": 1 << 30,
           "utilization_percent": 12.0, "temperature_c": 40.0, "power_w": 70.0}
    return {"id": node_id, "name": node_id, "status": status, "api_url": url,
            "raft_address": f"127.0.0.1:{free_port()}", "version": "test",
            "inventory": {"cpu_cores": 2, "memory_total_bytes": 4 << 30,
                          "memory_available_bytes": 2 << 30, "gpus": [gpu], "probe": "test"},
            "backends": {}, "updated": time.time()}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    node = InProcessNode(tmp_path_factory.mktemp("events"), NODES)
    node.start()
    key, record = new_api_key("admin", ADMIN)
    node.submit({"op": "create_api_key", "key": record})
    node.admin_key = key
    for node_id, url in zip(NODES, node.urls):
        node.submit({"op": "upsert_node", "node": node_record(node_id, url)})
    node.submit({"op": "upsert_node",
                 "node": node_record("node-ev-gone", f"http://127.0.0.1:{free_port()}")})
    yield node
    node.stop()


async def collect(client: NodeClient, until: Any, timeout: float = 20.0,
                  **kwargs: Any) -> list[tuple[str, Any]]:
    """Read the stream until `until(events)` holds (bounded by `timeout`)."""
    seen: list[tuple[str, Any]] = []

    async def read() -> None:
        async for event in client.events(**kwargs):
            seen.append(event)
            if until(seen):
                return

    try:
        await asyncio.wait_for(read(), timeout)
    finally:
        await client.close()
    return seen


def test_stream_needs_an_admin_key(cluster: InProcessNode) -> None:
    user_key, record = new_api_key("user", USER)
    cluster.submit({"op": "create_api_key", "key": record})
    for key, status in ((None, 401), ("gm-nope-nope", 401), (user_key, 403)):
        with pytest.raises(ApiError) as caught:
            asyncio.run(collect(NodeClient(cluster.url, key), lambda seen: True))
        assert caught.value.status == status


def test_snapshot_comes_first_and_holds_no_key_hashes(cluster: InProcessNode) -> None:
    events = asyncio.run(collect(NodeClient(cluster.urls[1], cluster.admin_key),
                                 lambda seen: True, telemetry=False))
    name, snapshot = events[0]
    assert name == "snapshot"
    assert snapshot["node_id"] == NODES[1]                 # the node the client attached to
    assert {n["id"] for n in snapshot["nodes"]} >= {*NODES, "node-ev-gone"}
    assert snapshot["raft"]["is_leader"] and snapshot["raft"]["has_quorum"]
    assert snapshot["api_keys"] and all("hash" not in k for k in snapshot["api_keys"])
    assert {"id", "name", "role"} <= set(snapshot["api_keys"][0])


def test_changes_arrive_as_records_and_words(cluster: InProcessNode, tmp_path: Path) -> None:
    gguf = write_tiny_gguf(tmp_path / "tiny.gguf")
    record = build_model_record({"name": "ev-model", "source": str(gguf), "replicas": 2})

    async def scenario() -> list[tuple[str, Any]]:
        client = NodeClient(cluster.url, cluster.admin_key)
        reader = asyncio.create_task(collect(
            client, lambda seen: any(e == "change" and any(
                c["collection"] == "instances" for c in d["changes"]) for e, d in seen),
            telemetry=False))
        await asyncio.sleep(0.5)                           # the snapshot is out
        await asyncio.to_thread(cluster.submit, {"op": "create_model", "model": record})
        await asyncio.to_thread(cluster.submit, {"op": "create_instance", "instance":
                                                 instance_record("ev-i1", "ev-model", "running",
                                                                 NODES[0], port=1234)})
        return await reader

    events = asyncio.run(scenario())
    changes = [c for e, d in events if e == "change" for c in d["changes"]]
    models = [c for c in changes if c["collection"] == "models"]
    assert models[0]["op"] == "upsert" and models[0]["record"]["name"] == "ev-model"
    assert models[0]["record"]["status"] == "deploying" and "instances" not in models[0]["record"]
    # The instance change re-sends its model's summary: one of two replicas is now ready.
    assert models[-1]["record"]["ready_replicas"] == 1
    instance = next(c for c in changes if c["collection"] == "instances")
    assert instance["record"]["state"] == "running" and instance["record"]["port"] == 1234
    words = [line for e, d in events if e == "change" for line in d["log"]]
    assert any("model ev-model" in line and "added" in line for line in words)


def test_telemetry_every_second_from_every_node(cluster: InProcessNode) -> None:
    events = asyncio.run(collect(
        NodeClient(cluster.url, cluster.admin_key),
        lambda seen: sum(e == "telemetry" for e, _ in seen) >= 3))
    samples = [d for e, d in events if e == "telemetry"]
    gaps = [b["t"] - a["t"] for a, b in zip(samples, samples[1:])]
    assert all(0.5 < gap < 3.0 for gap in gaps), gaps     # a steady tick, not a storm
    last = samples[-1]["nodes"]
    for node_id in NODES:
        assert last[node_id]["ok"], last[node_id]
        assert last[node_id]["gpus"][0]["name"] == "Test GPU"
    assert last["node-ev-gone"]["ok"] is False             # nothing listens there
    assert "unreachable" in last["node-ev-gone"]["error"]
    # These apps run no sampler (no daemon parts): a node reports what it registered.
    assert last[NODES[0]]["source"] == "inventory"


def test_history_is_bounded(cluster: InProcessNode) -> None:
    for history in (-1, 601, "soon"):
        with pytest.raises(ApiError) as caught:
            asyncio.run(collect(NodeClient(cluster.url, cluster.admin_key),
                                lambda seen: True, history=history))
        assert caught.value.status == 400 and "history" in str(caught.value)
    events = asyncio.run(collect(NodeClient(cluster.url, cluster.admin_key),
                                 lambda seen: len(seen) >= 2, history=60))
    assert [name for name, _ in events[:2]] == ["snapshot", "telemetry_history"]
    assert events[1][1]["nodes"] == {}          # these apps run no sampler: nothing to send


def test_shutdown_closes_open_streams(tmp_path: Path) -> None:
    """aiohttp waits up to 60 s for handlers at shutdown; an open console must not hold a
    stopping node up, so the stream ends and the client sees a clean end of stream."""
    node = InProcessNode(tmp_path / "raft", ("node-ev-stop",))
    node.start()
    key, record = new_api_key("admin", ADMIN)
    node.submit({"op": "create_api_key", "key": record})
    result: dict[str, Any] = {}

    async def read_until_closed() -> None:
        client = NodeClient(node.url, key)
        result["names"] = [name async for name, _ in client.events(telemetry=False)]
        await client.close()

    thread = threading.Thread(target=lambda: asyncio.run(read_until_closed()))
    thread.start()
    time.sleep(1.0)
    node.stop()
    thread.join(30)
    assert not thread.is_alive()
    assert result["names"][0] == "snapshot"


# --- the structured diff, without HTTP ------------------------------------------------------

def test_state_changes_from_views() -> None:
    model = {"name": "m", "backend": "llama.cpp", "replicas": 1, "schedule_error": None}
    old = empty_state()
    old["models"] = {"m": model}
    old["instances"] = {"i1": {"id": "i1", "model": "m", "node_id": "n", "state": "starting"}}
    old["api_keys"] = {"h1": {"id": "k1", "hash": "h1", "name": "a", "role": "admin"}}
    new = {**old, "instances": {"i1": {**old["instances"]["i1"], "state": "running"}},
           "api_keys": {}}
    changes = state_changes(StateView(old, 1), StateView(new, 2))
    assert {(c["collection"], c["op"], c["id"]) for c in changes} == {
        ("instances", "upsert", "i1"), ("api_keys", "remove", "k1"), ("models", "upsert", "m")}
    summary = next(c["record"] for c in changes if c["collection"] == "models")
    assert summary["status"] == "running" and summary["ready_replicas"] == 1
    # An equal record rebuilt by a command is not a change.
    rebuilt = {**new, "models": {"m": dict(model)}}
    assert state_changes(StateView(new, 2), StateView(rebuilt, 3)) == []


def test_usage_hours_and_users_when_the_state_has_them() -> None:
    """The gateway's collections: users as records; usage as whole recent hours."""
    from gpumesh.mesh import api_events

    class View:                                       # only what the two diffs read
        def __init__(self, usage, users):
            self.usage, self.users = usage, users

    hour_a, hour_b = {"r": {"requests": 1}}, {"r": {"requests": 2}}
    old = View({"0": {}, "3600": hour_a}, {"u": {"id": "u", "role": "user"}})
    new = View({"3600": hour_a, "7200": hour_b}, {})
    assert api_events._usage_changes(old.usage, new.usage) == [
        {"collection": "usage", "op": "remove", "id": "0"},
        {"collection": "usage", "op": "upsert", "id": "7200", "record": hour_b}]
    assert api_events._recent_hours({str(h * 3600): {} for h in range(30)}) == ["100800",
                                                                                 "104400"]
    assert api_events._diff("users", old.users, new.users, lambda r: r["id"], lambda r: r) == [
        {"collection": "users", "op": "remove", "id": "u"}]
