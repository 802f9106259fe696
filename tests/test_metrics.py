"""Prometheus `/metrics`: parsed with prometheus_client's own parser, its figures checked
against the requests made (in-process node, stand-in engine with a known usage)."""

from __future__ import annotations

import threading
import time
import urllib.request
from typing import Any

import openai
import pytest
from gateway_fixtures import FAKE_USAGE, add_model, bootstrap, openai_style_app
from inprocess import InProcessNode, node_secret, raft_threads
from prometheus_client.parser import text_string_to_metric_families
from tinymodels import write_tiny_gguf

from gpumesh.mesh.auth import engine_key
from gpumesh.mesh.metrics import GatewayMetrics
from gpumesh.mesh.probes.types import GpuDevice

NODE = "node-metrics"


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory):
    workdir = tmp_path_factory.mktemp("metrics")
    node = InProcessNode(workdir / "raft", (NODE,))
    node.start()
    port = node.serve(openai_style_app(engine_key(node_secret(NODE), "fake-1")))
    node.admin = bootstrap(node)
    add_model(node, "fake", write_tiny_gguf(workdir / "tiny.gguf"), [("fake-1", NODE, port)])
    yield node
    node.stop()
    assert raft_threads() == []


def scrape(url: str) -> dict[str, Any]:
    """{family name: family}, through prometheus_client's parser; no key needed."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as reply:
        assert reply.headers["Content-Type"].startswith("text/plain; version=")
        text = reply.read().decode()
    return {family.name: family for family in text_string_to_metric_families(text)}


def value(families: dict[str, Any], sample_name: str, **labels: str) -> float:
    family = families[sample_name.removesuffix("_total").removesuffix("_count")
                      .removesuffix("_sum").removesuffix("_bucket")]
    matches = [s.value for s in family.samples
               if s.name == sample_name and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(matches) == 1, (sample_name, labels, family.samples)
    return matches[0]


def test_metrics_count_requests_latency_ttft_tokens_and_in_flight(node) -> None:
    c = openai.OpenAI(base_url=node.url + "/v1", api_key=node.admin, max_retries=0, timeout=30)
    for _ in range(3):
        c.chat.completions.create(model="fake", messages=[{"role": "user", "content": "hi"}])
    for _ in range(2):
        list(c.chat.completions.create(model="fake", messages=[], stream=True))
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="no-such-model", messages=[])

    in_flight: list[float] = []

    def scrape_while_busy() -> None:
        time.sleep(0.4)
        in_flight.append(value(scrape(node.url), "gpumesh_requests_in_flight",
                               model="fake", instance="fake-1"))

    watcher = threading.Thread(target=scrape_while_busy)
    watcher.start()
    c.chat.completions.create(model="fake", messages=[], extra_body={"delay": 1.0})
    watcher.join()
    assert in_flight == [1.0]

    families = scrape(node.url)
    labels = {"node": NODE, "model": "fake", "route": "/v1/chat/completions"}
    assert value(families, "gpumesh_requests_total", code="200", **labels) == 6
    assert value(families, "gpumesh_request_duration_seconds_count", **labels) == 6
    assert value(families, "gpumesh_request_duration_seconds_bucket", le="+Inf", **labels) == 6
    slow = value(families, "gpumesh_request_duration_seconds_bucket", le="0.5", **labels)
    assert slow == 5                                     # the 1 s one is above 0.5 s
    assert value(families, "gpumesh_request_duration_seconds_sum", **labels) >= 1.0
    assert value(families, "gpumesh_time_to_first_token_seconds_count", model="fake") == 2
    # The stand-in reports usage on plain answers (4) and on the streams the gateway asked.
    assert value(families, "gpumesh_tokens_total", model="fake", type="prompt") == \
        6 * FAKE_USAGE["prompt_tokens"]
    assert value(families, "gpumesh_tokens_total", model="fake", type="completion") == \
        6 * FAKE_USAGE["completion_tokens"]
    assert value(families, "gpumesh_completion_tokens_per_second", model="fake") == \
        pytest.approx(6 * FAKE_USAGE["completion_tokens"] / 60)
    assert value(families, "gpumesh_requests_in_flight", model="fake", instance="fake-1") == 0
    assert "process_cpu_seconds" in families              # prometheus_client's own
    assert not any(name.startswith("gpumesh_gpu") for name in families)   # no GPUs here


def test_gpu_figures_come_from_the_telemetry_sample() -> None:
    gpu = GpuDevice(index=0, vendor="nvidia", name="NVIDIA H200", uuid="GPU-1234",
                    memory_total_bytes=141 << 30, memory_used_bytes=20 << 30,
                    utilization_percent=37.0, temperature_c=41.0, power_w=None)
    metrics = GatewayMetrics("n1", lambda: [gpu.to_dict()])
    from prometheus_client import generate_latest
    families = {f.name: f for f in text_string_to_metric_families(
        generate_latest(metrics.registry).decode())}
    labels = {"node": "n1", "gpu": "0", "vendor": "nvidia", "uuid": "GPU-1234",
              "name": "NVIDIA H200"}
    assert value(families, "gpumesh_gpu_utilization_ratio", **labels) == pytest.approx(0.37)
    assert value(families, "gpumesh_gpu_memory_used_bytes", **labels) == 20 << 30
    assert value(families, "gpumesh_gpu_memory_total_bytes", **labels) == 141 << 30
    assert value(families, "gpumesh_gpu_temperature_celsius", **labels) == 41
    assert families["gpumesh_gpu_power_watts"].samples == []     # not read: no made-up zero
