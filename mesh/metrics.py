"""Prometheus `/metrics` on every node, in prometheus_client's text format.

The gateway counts into plain ints and small fixed-bucket histograms, one object per (model,
route) found with one dict lookup (a bisect and a few additions per observation, no locks:
everything runs on the event loop); prometheus_client reads them only when scraped, through
a custom collector. So the hot path never pays for label lookups, and the exposition follows
prometheus_client's conventions exactly.

Series (every one carries `node`):
- `gpumesh_requests_total{model,route,code}`, counter
- `gpumesh_request_duration_seconds{model,route}`, histogram (whole answer)
- `gpumesh_time_to_first_token_seconds{model}`, histogram (streams: first event)
- `gpumesh_tokens_total{model,type=prompt|completion}`, counter (rate() gives tokens/s)
- `gpumesh_completion_tokens_per_second{model}`, gauge: completion tokens over the last minute
- `gpumesh_requests_in_flight{model,instance}`, gauge, counted by the node that calls the
  engine (so a sum over nodes counts each request once)
- `gpumesh_gpu_{utilization_ratio,memory_used_bytes,memory_total_bytes,temperature_celsius,
  power_watts}{gpu,vendor,uuid,name}`: the latest sample of this node's telemetry sampler
  (mesh/telemetry.py, 1 Hz; read at scrape time, never probed here); none without GPUs.
Per-key and per-user figures are not here (the endpoint needs no key): see /api/usage.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections import defaultdict
from typing import Any, Callable, Iterator

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                    HistogramMetricFamily, Metric)
from prometheus_client.exposition import choose_encoder
from aiohttp import web

from .limits import WINDOW_S, Window

__all__ = ["GatewayMetrics", "GpuSource"]

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                   120.0, 300.0)
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

# A GPU source returns the telemetry sampler's latest GPUs (`GpuDevice.to_dict()` each:
# index, vendor, name, uuid, memory_*_bytes, utilization_percent, temperature_c, power_w).
GpuSource = Callable[[], list[dict[str, Any]]]
# (field, series, help, scale): utilisation becomes a 0-1 ratio, Prometheus' convention.
_GPU_FIGURES = (
    ("utilization_percent", "gpumesh_gpu_utilization_ratio", "GPU busy share, 0 to 1", 0.01),
    ("memory_used_bytes", "gpumesh_gpu_memory_used_bytes", "GPU memory in use", 1.0),
    ("memory_total_bytes", "gpumesh_gpu_memory_total_bytes", "GPU memory", 1.0),
    ("temperature_c", "gpumesh_gpu_temperature_celsius", "GPU temperature", 1.0),
    ("power_w", "gpumesh_gpu_power_watts", "GPU power draw", 1.0))


class Histogram:
    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)     # the last one is +Inf
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    def cumulative(self) -> list[tuple[str, int]]:
        running, out = 0, []
        for bound, count in zip((*map(str, self.bounds), "+Inf"), self.counts):
            running += count
            out.append((bound, running))
        return out


class ModelSeries:
    """What is counted per model (whatever the route)."""

    __slots__ = ("ttft", "prompt", "completion", "recent")

    def __init__(self) -> None:
        self.ttft = Histogram(TTFT_BUCKETS)
        self.prompt = 0
        self.completion = 0
        self.recent = Window()            # completion tokens over the last minute


class RouteSeries:
    """What is counted per (model, route): answers by status code and their latency."""

    __slots__ = ("codes", "latency", "model")

    def __init__(self, model: ModelSeries) -> None:
        self.codes: dict[int, int] = {}
        self.latency = Histogram(LATENCY_BUCKETS)
        self.model = model


class GatewayMetrics:
    """What the gateway counts for Prometheus, and the collector that exposes it."""

    def __init__(self, node_id: str, gpu_source: GpuSource | None = None) -> None:
        self.node_id = node_id
        self.gpu_source = gpu_source
        self.models: dict[str, ModelSeries] = {}
        self.routes: dict[tuple[str, str], RouteSeries] = {}
        self.in_flight: defaultdict[tuple[str, str], int] = defaultdict(int)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)
        ProcessCollector(registry=self.registry)

    # --- the hot path ----------------------------------------------------------------------

    def observe(self, model: str, route: str, status: int, seconds: float,
                ttft: float | None, prompt_tokens: int, completion_tokens: int) -> None:
        series = self.routes.get((model, route))
        if series is None:
            series = self._new_series(model, route)
        codes = series.codes
        codes[status] = codes.get(status, 0) + 1
        series.latency.observe(seconds)
        per_model = series.model
        if ttft is not None:
            per_model.ttft.observe(ttft)
        if prompt_tokens:
            per_model.prompt += prompt_tokens
        if completion_tokens:
            per_model.completion += completion_tokens
            per_model.recent.add(int(time.time()), completion_tokens)

    def _new_series(self, model: str, route: str) -> RouteSeries:
        per_model = self.models.get(model)
        if per_model is None:
            per_model = self.models[model] = ModelSeries()
        series = self.routes[(model, route)] = RouteSeries(per_model)
        return series

    # --- scrape time -----------------------------------------------------------------------

    def collect(self) -> Iterator[Metric]:
        node = self.node_id
        routes = sorted(self.routes.items())
        models = sorted(self.models.items())
        requests = CounterMetricFamily("gpumesh_requests", "Gateway requests answered",
                                       labels=["node", "model", "route", "code"])
        for (model, route), series in routes:
            for code, count in sorted(series.codes.items()):
                requests.add_metric([node, model, route, str(code)], count)
        yield requests
        latency = HistogramMetricFamily("gpumesh_request_duration_seconds",
                                        "Time to the whole answer",
                                        labels=["node", "model", "route"])
        for (model, route), series in routes:
            latency.add_metric([node, model, route], series.latency.cumulative(),
                               series.latency.total)
        yield latency
        ttft = HistogramMetricFamily("gpumesh_time_to_first_token_seconds",
                                     "Time to a stream's first event", labels=["node", "model"])
        for model, per_model in models:
            if per_model.ttft.total or any(per_model.ttft.counts):
                ttft.add_metric([node, model], per_model.ttft.cumulative(), per_model.ttft.total)
        yield ttft
        tokens = CounterMetricFamily("gpumesh_tokens", "Tokens processed, as engines report",
                                     labels=["node", "model", "type"])
        for model, per_model in models:
            if per_model.completion:
                tokens.add_metric([node, model, "completion"], per_model.completion)
            if per_model.prompt:
                tokens.add_metric([node, model, "prompt"], per_model.prompt)
        yield tokens
        speed = GaugeMetricFamily("gpumesh_completion_tokens_per_second",
                                  "Completion tokens per second over the last minute",
                                  labels=["node", "model"])
        now = int(time.time())
        for model, per_model in models:
            if per_model.completion:
                speed.add_metric([node, model], per_model.recent.count(now) / WINDOW_S)
        yield speed
        in_flight = GaugeMetricFamily("gpumesh_requests_in_flight",
                                      "Requests an engine of this node is answering",
                                      labels=["node", "model", "instance"])
        for (model, instance), count in sorted(self.in_flight.items()):
            in_flight.add_metric([node, model, instance], count)
        for idle in [k for k, count in self.in_flight.items() if count == 0]:
            del self.in_flight[idle]            # a gone instance's series ends after a 0
        yield in_flight
        yield from self._gpu_metrics()

    def _gpu_metrics(self) -> Iterator[Metric]:
        gpus = self.gpu_source() if self.gpu_source is not None else []
        if not gpus:
            return
        for field, name, doc, scale in _GPU_FIGURES:
            family = GaugeMetricFamily(name, doc, labels=["node", "gpu", "vendor", "uuid",
                                                          "name"])
            for gpu in gpus:
                value = gpu.get(field)
                if value is not None:
                    family.add_metric([self.node_id, str(gpu.get("index")),
                                       str(gpu.get("vendor") or ""), str(gpu.get("uuid") or ""),
                                       str(gpu.get("name") or "")], float(value) * scale)
            yield family

    async def handle(self, request: web.Request) -> web.Response:
        # The format the scraper asks for (text 0.0.4 / 1.0.0, or OpenMetrics), as
        # prometheus_client's own HTTP handlers choose it.
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        return web.Response(body=encoder(self.registry), headers={"Content-Type": content_type})
