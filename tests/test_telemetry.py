"""The telemetry sampler (mesh/telemetry.py) on this machine's real CPU probe, and its route.

The sampler runs at a short interval here (50 ms) so its ring buffer fills and wraps within
a fraction of a second; the daemon runs it at 1 s. The route is served by the daemon's own
app (`http_app`) on a real single-node store, with and without a sampler registered.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest
from inprocess import InProcessNode, http_request

from gpumesh.mesh.auth import ADMIN, new_api_key
from gpumesh.mesh.daemon import http_app
from gpumesh.mesh.probes import CpuProbe
from gpumesh.mesh.telemetry import TELEMETRY, TelemetrySampler

NODE_ID = "node-telemetry-test"
SAMPLE_KEYS = {"time", "probe", "cpu_cores", "cpu_percent", "memory_total_bytes",
               "memory_available_bytes", "gpus", "error"}


def _wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def _telemetry_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "gpumesh-telemetry"]


@pytest.fixture
def sampler():
    probe = CpuProbe()
    sampler = TelemetrySampler(interval_s=0.05, keep_s=0.2)    # a ring of 4 samples
    sampler.start(probe)
    yield sampler
    sampler.stop()
    probe.close()


def test_ring_buffer_keeps_the_newest_samples_in_order(sampler: TelemetrySampler) -> None:
    _wait_for(lambda: sampler.cost()["samples"] >= 7)
    sampler.stop()                               # the fixture's stop is then a no-op
    history = sampler.history()
    assert len(history) == 4                     # wrapped: only keep_s / interval_s remain
    times = [s["time"] for s in history]
    assert times == sorted(times) and len(set(times)) == 4
    assert sampler.latest() == history[-1]

    sample = history[-1]
    assert set(sample) == SAMPLE_KEYS
    assert sample["probe"] == "cpu" and sample["gpus"] == [] and sample["error"] is None
    with CpuProbe() as probe:
        assert sample["cpu_cores"] == probe.cpu_cores()
        assert sample["memory_total_bytes"] == probe.memory()[0]
    assert 0 < sample["memory_available_bytes"] <= sample["memory_total_bytes"]
    # From the second sample on, the machine's CPU use over the last interval.
    assert all(s["cpu_percent"] is not None and 0.0 <= s["cpu_percent"] <= 100.0
               for s in history)

    # Cursors: since(t) is strictly after t; history(seconds) counts back from the newest.
    assert sampler.since(times[1]) == history[2:]
    assert sampler.since(0) == history and sampler.since(time.time() + 60) == []
    assert sampler.history(seconds=0.0) == history[-1:]
    assert sampler.history(seconds=times[-1] - times[1]) == history[1:]

    cost = sampler.cost()
    assert cost["samples"] >= 7 and cost["thread_cpu_s"] > 0
    assert cost["cpu_ms_per_sample"] > 0 and cost["core_percent"] > 0


def test_stop_joins_the_thread_and_keeps_the_samples() -> None:
    probe = CpuProbe()
    sampler = TelemetrySampler(interval_s=0.05, keep_s=1.0)
    assert sampler.latest() is None and sampler.history() == [] and not sampler.running
    sampler.start(probe)
    _wait_for(lambda: sampler.latest() is not None)
    with pytest.raises(RuntimeError, match="already started"):
        sampler.start(probe)
    sampler.stop()
    sampler.stop()                               # idempotent
    probe.close()
    assert not sampler.running and _telemetry_threads() == []
    kept = sampler.history()
    time.sleep(0.15)
    assert sampler.history() == kept and kept    # nothing sampled after stop; data stays


def test_a_failing_probe_gives_samples_with_the_reason() -> None:
    probe = CpuProbe()
    probe.close()                                # every inventory() now raises ProbeError
    sampler = TelemetrySampler(interval_s=0.05, keep_s=1.0)
    sampler.start(probe)
    try:
        _wait_for(lambda: len(sampler.history()) >= 2)
    finally:
        sampler.stop()
    sample = sampler.latest()
    assert sample is not None and set(sample) == SAMPLE_KEYS
    assert "closed" in sample["error"] and sample["gpus"] == []
    assert sample["memory_total_bytes"] is None


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        TelemetrySampler(interval_s=0)
    with pytest.raises(ValueError):
        TelemetrySampler(interval_s=2.0, keep_s=1.0)


# --- the route ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory):
    node = InProcessNode(tmp_path_factory.mktemp("raft"), (NODE_ID,))
    node.start()
    key, record = new_api_key("admin", ADMIN)
    node.submit({"op": "create_api_key", "key": record, "only_if_no_admin": True})
    node.admin_key = key
    yield node
    node.stop()


def test_route_serves_this_nodes_samples(node: InProcessNode, sampler: TelemetrySampler) -> None:
    app = http_app(node.store, NODE_ID, node.session, node.started, lambda: [])
    app[TELEMETRY] = sampler
    url = f"http://127.0.0.1:{node.serve(app)}/api/telemetry"
    _wait_for(lambda: len(sampler.history()) >= 3)

    reply = asyncio.run(http_request(url, "GET", key=node.admin_key))
    assert reply.status == 200, reply
    body = reply.body
    assert body["node_id"] == NODE_ID and body["interval_s"] == 0.05 and body["keep_s"] == 0.2
    assert 3 <= len(body["samples"]) <= 4
    assert set(body["latest"]) == SAMPLE_KEYS
    assert body["latest"]["time"] >= body["samples"][-1]["time"]
    assert body["sampler"]["samples"] >= 3

    cursor = body["samples"][-1]["time"]
    _wait_for(lambda: sampler.latest()["time"] > cursor)
    newer = asyncio.run(http_request(f"{url}?since={cursor}", "GET", key=node.admin_key)).body
    assert newer["samples"] and all(s["time"] > cursor for s in newer["samples"])

    bad = asyncio.run(http_request(f"{url}?since=yesterday", "GET", key=node.admin_key))
    assert bad.status == 400 and bad.error["param"] == "since"
    assert asyncio.run(http_request(url, "GET")).status == 401    # admin key required


def test_route_without_a_sampler_says_so(node: InProcessNode) -> None:
    reply = asyncio.run(http_request(node.url + "/api/telemetry", "GET", key=node.admin_key))
    assert reply.status == 503
    assert reply.error["code"] == "telemetry_unavailable"


def test_proc_stat_missing_gives_no_cpu_figure(tmp_path: Path) -> None:
    probe = CpuProbe()
    sampler = TelemetrySampler(interval_s=0.05, keep_s=1.0, proc_root=tmp_path)
    sampler.start(probe)
    try:
        _wait_for(lambda: len(sampler.history()) >= 2)
    finally:
        sampler.stop()
        probe.close()
    assert all(s["cpu_percent"] is None for s in sampler.history())
