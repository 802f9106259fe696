"""Streams and engine connections: what the gateway does to keep streams close to a bare
relay's cost (in-process node, stand-in engines that count their connections).

- An engine that keeps connections (vLLM, SGLang) serves every stream on one pooled
  connection; llama.cpp, which closes a connection after a stream, gets a fresh one per
  stream (`Connection: close`), so no request ever meets a stale pooled connection.
- A stream ends for the client at its `[DONE]` event: the last event and the end of the
  answer go out together, even while the engine has not ended its answer yet (its
  connection is still read to the end and pooled).
"""

from __future__ import annotations

import asyncio
import http.client
import json
import threading
import time
import urllib.request
from typing import Any

import pytest
from aiohttp import web
from gateway_fixtures import FAKE_USAGE, add_model, bootstrap
from inprocess import InProcessNode, node_secret, raft_threads
from prometheus_client.parser import text_string_to_metric_families
from tinymodels import write_tiny_gguf

from gpumesh.mesh.auth import engine_key

NODE = "node-streams"
CONNECTIONS = web.AppKey("connections", set)
RELEASE = web.AppKey("release", threading.Event)


def counting_engine(key: str) -> web.Application:
    """Streams two events, usage and [DONE]; notes each connection it serves a request on.
    `"hold_end": true` holds the end of the answer (after [DONE]) until the test releases
    it (bounded)."""
    connections: set[Any] = set()
    release = threading.Event()

    async def chat(request: web.Request) -> web.StreamResponse:
        assert request.headers.get("Authorization") == f"Bearer {key}"
        body = await request.json()
        connections.add(request.transport)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for piece in ("held", " answer"):
            await response.write(_event({"id": "c", "object": "chat.completion.chunk",
                                         "choices": [{"index": 0,
                                                      "delta": {"content": piece}}]}))
        await response.write(_event({"id": "c", "choices": [], "usage": FAKE_USAGE}))
        await response.write(b"data: [DONE]\n\n")
        if body.get("hold_end"):
            await asyncio.to_thread(release.wait, 30)
        await response.write_eof()
        return response

    app = web.Application()
    app[CONNECTIONS] = connections
    app[RELEASE] = release
    app.router.add_post("/v1/chat/completions", chat)
    return app


def _event(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory):
    workdir = tmp_path_factory.mktemp("streams")
    node = InProcessNode(workdir / "raft", (NODE,))
    node.start()
    node.admin = bootstrap(node)
    gguf = write_tiny_gguf(workdir / "tiny.gguf")
    node.engines = {}
    for name, backend in (("keeps", "vllm"), ("closes", "llama.cpp")):
        app = counting_engine(engine_key(node_secret(NODE), f"{name}-1"))
        node.engines[name] = app
        add_model(node, name, gguf, [(f"{name}-1", NODE, node.serve(app))])
        # Routing reads the backend to know whether the engine keeps stream connections.
        node.submit({"op": "update_model", "name": name, "changes": {"backend": backend}})
    yield node
    node.stop()
    assert raft_threads() == []


def stream(node: InProcessNode, model: str, connection: http.client.HTTPConnection | None = None,
           **extra: Any) -> bytes:
    """A streamed chat read to its end (the chunked answer's terminator). On `connection`
    when given, which stays open (a client that closes its connection cancels the request
    on the test server: the daemon's does not cancel, but the test must not depend on it)."""
    body = json.dumps({"model": model, "messages": [], "stream": True, **extra}).encode()
    own = connection is None
    connection = connection or http.client.HTTPConnection(node.url.removeprefix("http://"),
                                                          timeout=20)
    try:
        connection.request("POST", "/v1/chat/completions", body=body, headers={
            "Authorization": f"Bearer {node.admin}", "Content-Type": "application/json"})
        reply = connection.getresponse()
        assert reply.status == 200
        return reply.read()
    finally:
        if own:
            connection.close()


@pytest.mark.parametrize("model, connections", [("keeps", 1), ("closes", 5)])
def test_streams_share_a_pooled_connection_only_where_the_engine_keeps_it(
        node, model, connections) -> None:
    for _ in range(5):
        answer = stream(node, model)
        assert answer.endswith(b"data: [DONE]\n\n") and b'"held"' in answer
        assert b'"usage"' not in answer        # asked for by the gateway, not the client
    assert len(node.engines[model][CONNECTIONS]) == connections


def metric(node: InProcessNode, sample: str, **labels: str) -> float:
    with urllib.request.urlopen(node.url + "/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return sum(s.value for family in text_string_to_metric_families(text)
               for s in family.samples
               if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()))


def test_a_stream_ends_for_the_client_at_done_while_the_engine_still_holds_its_end(
        node) -> None:
    engine = node.engines["keeps"]
    tokens = {"model": "keeps", "type": "completion"}
    before = metric(node, "gpumesh_tokens_total", **tokens)
    client = http.client.HTTPConnection(node.url.removeprefix("http://"), timeout=20)
    try:
        # Read to the end while the engine holds its answer's end: before, the client
        # waited for it (here: until the engine's bounded wait ran out).
        answer = stream(node, "keeps", client, hold_end=True)
        assert not engine[RELEASE].is_set()
        assert answer.endswith(b"data: [DONE]\n\n")
    finally:
        engine[RELEASE].set()
    # The gateway still reads the engine's answer to its end, then settles the request.
    deadline = time.monotonic() + 20
    while metric(node, "gpumesh_requests_in_flight", model="keeps") > 0:
        assert time.monotonic() < deadline, "the held stream never settled"
        time.sleep(0.05)
    client.close()
    assert (metric(node, "gpumesh_tokens_total", **tokens) - before
            == FAKE_USAGE["completion_tokens"])
    stream(node, "keeps")                 # on the same connection: it went back to the pool
    assert len(engine[CONNECTIONS]) == 1


USAGE = b'{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}'


@pytest.mark.parametrize("events, stripped", [
    # vLLM / OpenAI: a usage-only event (no choices) before [DONE], LF or CRLF
    (b'data: {"id":"c","choices":[],"usage":' + USAGE + b'}\n\ndata: [DONE]\n\n',
     b"data: [DONE]\n\n"),
    (b'data: {"id":"c","choices":[],"usage":' + USAGE + b'}\r\n\r\n', b""),
    # an event with more lines than its data line: the usage object is read alone
    (b'event: usage\ndata: {"choices": [ ], "usage": ' + USAGE + b'}\n\n', b""),
    # llama.cpp: usage (and timings) on the last content event: counted, never stripped
    (b'data: {"choices":[{"delta":{},"finish_reason":"stop"}],"usage":' + USAGE
     + b',"timings":{"n":1}}\n\n', None),
])
def test_engine_usage_events_are_counted_once_and_kept_from_clients_that_did_not_ask(
        events, stripped) -> None:
    from gpumesh.mesh.gateway.relay import Exchange, _events
    for strip in (True, False):
        exchange = Exchange(0.0)
        exchange.strip_usage = strip
        out = _events(events, exchange)
        assert (exchange.prompt_tokens, exchange.completion_tokens) == (3, 4)
        assert out == (stripped if strip and stripped is not None else events)


def test_usage_null_on_every_event_counts_nothing_and_changes_nothing() -> None:
    from gpumesh.mesh.gateway.relay import Exchange, _events
    events = b'data: {"choices":[{"delta":{"content":"a"}}],"usage":null}\n\n' * 3
    exchange = Exchange(0.0)
    exchange.strip_usage = True
    assert _events(events, exchange) == events
    assert (exchange.prompt_tokens, exchange.completion_tokens, exchange.usage_seen) == \
        (0, 0, False)
