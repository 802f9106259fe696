"""The console's parts without a screen: the store fed by stream events, the braille chart,
table cells, and the client's SSE parser."""

from __future__ import annotations

import asyncio

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gpumesh.tui.client import ApiError, NodeClient
from gpumesh.tui.format import bar, needs, span
from gpumesh.tui.store import HISTORY_SAMPLES, ClusterModel, GpuRef
from gpumesh.tui.widgets import _braille_row


def node(node_id: str, address: str, gpus: int = 1) -> dict:
    return {"id": node_id, "name": f"name-{node_id}", "status": "ready",
            "api_url": f"http://{address}:8470", "raft_address": f"{address}:8471",
            "inventory": {"memory_total_bytes": 100, "memory_available_bytes": 40,
                          "gpus": [gpu(i, 10.0) for i in range(gpus)]}}


def gpu(index: int, util: float) -> dict:
    return {"index": index, "name": "G", "utilization_percent": util, "temperature_c": 50.0,
            "power_w": 100.0, "memory_used_bytes": 25, "memory_total_bytes": 100}


def snapshot(**extra) -> dict:
    return {"node_id": "a", "version": 1,
            "raft": {"leader": "10.0.0.1:8471", "term": 2, "has_quorum": True,
                     "members": ["10.0.0.1:8471", "10.0.0.2:8471"]},
            "nodes": [node("a", "10.0.0.1"), node("b", "10.0.0.2", gpus=0)],
            "models": [{"name": "m", "replicas": 1, "status": "running", "ready_replicas": 1}],
            "instances": [{"id": "i1", "model": "m", "node_id": "a", "state": "running",
                           "allocation": {"gpu_indices": [0]}}],
            "api_keys": [{"id": "k1", "name": "admin", "role": "admin"}], **extra}


def test_snapshot_then_changes_then_raft() -> None:
    model = ClusterModel(clock=lambda: 100.0)
    assert "nodes" in model.apply("snapshot", snapshot())
    assert model.role(model.nodes["a"]) == "leader" and model.role(model.nodes["b"]) == "follower"
    assert model.instances_on("a", 0)[0]["id"] == "i1" and model.instances_on("a", 1) == []
    topics = model.apply("change", {"version": 2, "log": ["instance i1 removed"], "changes": [
        {"collection": "instances", "op": "remove", "id": "i1"},
        {"collection": "models", "op": "upsert", "id": "m",
         "record": {"name": "m", "replicas": 1, "status": "deploying", "ready_replicas": 0}},
        {"collection": "rates", "op": "upsert", "id": "n", "record": {}}]})   # unknown: skipped
    assert topics == {"instances", "models", "log"}
    assert model.instances == {} and model.models["m"]["status"] == "deploying"
    assert model.log[-1] == (100.0, "instance i1 removed")
    assert "log" in model.apply("raft", {"leader": "10.0.0.2:8471", "term": 3,
                                         "members": ["10.0.0.1:8471", "10.0.0.2:8471"]})
    assert model.leader_node_id() == "b" and "name-b" in model.log[-1][1]


def test_telemetry_series_and_a_node_going_away() -> None:
    model = ClusterModel()
    model.apply("snapshot", snapshot())
    for step in range(HISTORY_SAMPLES + 5):                   # the ring keeps ten minutes
        model.apply("telemetry", {"t": step, "nodes": {
            "a": {"ok": True, "gpus": [gpu(0, float(step % 100))]},
            "b": {"ok": True, "gpus": [], "cpu_percent": 7.0, "memory_total_bytes": 100,
                  "memory_available_bytes": 75}}})
    series = model.series[GpuRef("a", 0)]
    assert len(series.util) == HISTORY_SAMPLES and series.util[-1] == float(604 % 100)
    assert series.mem[-1] == 25.0
    # A node without GPUs charts its CPU and RAM.
    assert model.node_load("b") == 7.0 and model.series[GpuRef("b", None)].mem[-1] == 25.0
    topics = model.apply("telemetry", {"t": 999, "nodes": {
        "a": {"ok": True, "gpus": [gpu(0, 1.0)]}, "b": {"ok": False, "error": "unreachable"}}})
    assert {"nodes", "log"} <= topics
    assert model.node_state("b") == "unreachable" and "does not answer" in model.log[-1][1]
    assert model.series[GpuRef("b", None)].util[-1] is None        # a gap, not a zero


def test_history_replaces_a_nodes_series() -> None:
    model = ClusterModel()
    model.apply("snapshot", snapshot())
    model.apply("telemetry", {"t": 1, "nodes": {"a": {"ok": True, "gpus": [gpu(0, 99.0)]}}})
    samples = [{"time": t, "gpus": [{"index": 0, "utilization_percent": float(t),
                                     "memory_used_bytes": 50}]} for t in range(10)]
    model.apply("telemetry_history", {"nodes": {"a": samples}})
    series = model.series[GpuRef("a", 0)]
    assert list(series.util) == [float(t) for t in range(10)]
    assert series.mem[-1] == 50.0                  # the total comes from the latest reading


def test_known_nodes_attached_first_stopped_last() -> None:
    model = ClusterModel()
    data = snapshot()
    data["nodes"].insert(0, {**node("c", "10.0.0.3"), "name": "aaa", "status": "stopped"})
    data["node_id"] = "b"
    model.apply("snapshot", data)
    assert [n for n, _, _ in model.known_nodes()] == ["b", "a", "c"]


def test_braille_rows_fill_from_the_bottom() -> None:
    # Two rows of four dots: 8 levels. Level 8 fills both rows; 4 only the bottom; None
    # leaves a gap; 0 draws nothing.
    levels = [8, 4, None, 0]
    assert _braille_row(levels, 0, 2) == "⡇ "       # top row: the left column only
    assert _braille_row(levels, 1, 2) == "⣿ "       # bottom row: both columns full
    assert bar(56.0, 8).startswith("▕████▌") and bar(None).endswith("-")
    assert span(3725) == "1h02m" and span(5) == "5s" and span(90061) == "1d01h"
    assert needs({"total_bytes": 3 << 30, "by_device": {"gpu": 3 << 30, "cpu": 36 << 20}}) \
        == "needs 36.0 MiB on the CPU or 3.00 GiB on GPUs"
    assert needs({"total_bytes": 1 << 29}) == "needs 512.0 MiB" and needs(None) == ""


def test_sse_parser_and_missing_routes() -> None:
    async def scenario() -> None:
        async def events(request: web.Request) -> web.StreamResponse:
            response = web.StreamResponse()
            await response.prepare(request)
            await response.write(b": comment\n\nevent: one\ndata: {\"a\": 1}\n\n"
                                 b"event: two\ndata: [1,\ndata: 2]\n\n")
            return response

        app = web.Application()
        app.router.add_get("/api/events", events)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        client = NodeClient(f"http://127.0.0.1:{server.port}", "key")
        try:
            got = [e async for e in client.events()]
            assert got == [("one", {"a": 1}), ("two", [1, 2])]
            with pytest.raises(ApiError) as missing:
                await client.get("/api/users")
            assert missing.value.status == 404 and missing.value.missing_route
            await server.close()
            with pytest.raises(ApiError) as gone:
                await client.get("/api/status")
            assert gone.value.status == 0 and "cannot reach" in str(gone.value)
        finally:
            await client.close()

    asyncio.run(scenario())


def test_instance_progress_words() -> None:
    from gpumesh.tui.views.instances import _one_line, _progress

    assert _progress({"progress": {"step": "Collecting vllm", "elapsed_s": 75.2}}) == "1m15s"
    assert _progress({"progress": {"done_bytes": 50, "total_bytes": 200}}) == "25%"
    assert _progress({"progress": None}) == "" and _progress({}) == ""
    assert _one_line("Traceback\n  File x\nValueError: bad\n\n") == "ValueError: bad"


def test_usage_rates_from_the_hours_a_node_folds() -> None:
    now = [1000.0]
    model = ClusterModel(clock=lambda: now[0])
    row = {"model": "m", "key": "k1", "requests": 10, "errors": 0, "prompt_tokens": 100,
           "completion_tokens": 50}
    model.apply("snapshot", snapshot(usage={"3600": {"n|k1|m": row}}, users=[]))
    assert model.has_usage and model.has_users and model.usage_rates() == {}
    for second, requests in ((10, 13), (40, 19)):       # two folds: +3, then +6 requests
        now[0] = 1000.0 + second
        grown = {**row, "requests": requests, "completion_tokens": 50 + 10 * (requests - 10)}
        topics = model.apply("change", {"changes": [
            {"collection": "usage", "op": "upsert", "id": "3600", "record": {"n|k1|m": grown}}]})
        assert topics == {"usage"}
    assert model.usage_counted[("m", "k1")] == (9, 90, 0)
    now[0] = 1040.0
    rpm, tps = model.usage_rates()[("m", "k1")]
    assert rpm == 60 * 9 / 40 and tps == 90 / 40           # since the snapshot, 40 s ago
    now[0] = 1080.0                                         # a minute on: since the 2nd fold
    rpm, tps = model.usage_rates()[("m", "k1")]
    assert rpm == 60 * 6 / 70 and tps == 60 / 70
    # A new hour: its rows start from zero, the counters keep growing; old hours are dropped.
    for hour in ("7200", "10800"):
        model.apply("change", {"changes": [{"collection": "usage", "op": "upsert", "id": hour,
                                            "record": {"n|k1|m": {**row, "requests": 1}}}]})
    assert sorted(model.usage) == ["10800", "7200"]
    assert model.usage_counted[("m", "k1")][0] == 9 + 1 + 1
    model.apply("telemetry", {"t": 1, "nodes": {}})
    assert model.usage_tps[-1] is not None                  # the chart ticks at 1 Hz
