"""The gateway's promise while instances die: nothing reaches the client before an engine's
first byte, so an instance that fails before then is retried on another one.

In-process: a real single-node store, the daemon's own app served twice (this node and a
peer node, one replicated state), one real llama.cpp engine that answers, and stand-in
engines that die at a chosen moment (a real engine cannot be made to crash at a chosen
byte). The multi-daemon failover test (test_cluster.py) guards the same promise with real
daemons killed under load.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import pytest
from gateway_fixtures import GRAMMAR, LlamaEngine, engine_that_dies
from harness import free_port
from inprocess import InProcessNode, http_request, instance_record
from tinymodels import write_tiny_gguf

from gpumesh.mesh.auth import ADMIN, new_api_key
from gpumesh.mesh.deployments import build_model_record

NODE_ID = "node-retry-test"
PEER_ID = "node-retry-peer"


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):
    workdir = tmp_path_factory.mktemp("gateway-retry")
    engine = LlamaEngine(write_tiny_gguf(workdir / "tiny.gguf"), workdir / "engine.log")
    node = InProcessNode(workdir / "raft", (NODE_ID, PEER_ID))
    try:
        engine.wait_healthy()
        node.start()
        key, record = new_api_key("admin", ADMIN)
        node.submit({"op": "create_api_key", "key": record, "only_if_no_admin": True})
        for node_id, url in ((NODE_ID, node.urls[0]), (PEER_ID, node.urls[1])):
            node.submit({"op": "upsert_node", "node": {
                "id": node_id, "name": node_id, "status": "ready", "api_url": url,
                "updated": time.time()}})
        dying = {"headers": node.serve(engine_that_dies("/v1/chat/completions")),
                 # promises a 1000-byte JSON body, sends 10 bytes of it, and dies
                 "body": node.serve(engine_that_dies(
                     "/v1/chat/completions", sends=b'{"id":"cut', headers={
                         "Content-Type": "application/json", "Content-Length": "1000"})),
                 "dead": free_port()}

        def model(name: str, instances: list[tuple[str, str, int]]) -> None:
            spec = {"name": name, "source": str(workdir / "tiny.gguf"),
                    "replicas": len(instances)}
            node.submit({"op": "create_model", "model": build_model_record(spec)})
            for instance_id, node_id, port in instances:
                node.submit({"op": "create_instance", "instance": instance_record(
                    instance_id, name, "running", node_id, port=port)})

        # Ties on outstanding requests go to the lowest id: the dying instance ("a-…") is
        # tried first, every time, and the live one ("b-…") must answer instead.
        model("peer-gone", [("a-peer-dead", PEER_ID, dying["dead"]),
                            ("b-peer-live", PEER_ID, engine.port)])
        model("cut-stream", [("a-cut-stream", NODE_ID, dying["headers"]),
                             ("b-live-stream", NODE_ID, engine.port)])
        model("cut-body", [("a-cut-body", NODE_ID, dying["body"]),
                           ("b-live-body", NODE_ID, engine.port)])
        yield node, key
    finally:
        node.stop()
        engine.stop()


def chat(setup: Any, model: str, **extra: Any):
    node, key = setup
    body = {"model": model, "messages": [{"role": "user", "content": "Say hello."}],
            "max_tokens": 16, "grammar": GRAMMAR, **extra}
    return asyncio.run(http_request(node.url + "/v1/chat/completions", "POST", key=key,
                                    json_body=body))


def answer_text(raw: bytes, stream: bool) -> str:
    if not stream:
        return json.loads(raw)["choices"][0]["message"]["content"]
    events = [e for e in raw.decode().split("\n\n") if e]
    assert events[-1] == "data: [DONE]", events[-1]
    return "".join(json.loads(e[6:])["choices"][0]["delta"].get("content") or ""
                   for e in events[:-1])


def tried(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage().split()[1] for r in caplog.records
            if "unreachable, trying another" in r.getMessage()]


@pytest.mark.parametrize("stream", [False, True])
def test_a_peer_whose_instance_is_gone_hands_the_request_back(setup, caplog, stream) -> None:
    """The peer gateway cannot reach its own engine: it says so (502 + X-Gpumesh-Retry), and
    the forwarding gateway tries the next instance instead of relaying that 502."""
    with caplog.at_level(logging.WARNING, logger="gpumesh.gateway"):
        reply = chat(setup, "peer-gone", stream=stream)
    assert reply.status == 200, reply
    assert answer_text(reply.raw, stream) == "hello there"
    assert "X-Gpumesh-Retry" not in reply.headers
    assert "a-peer-dead" in tried(caplog)


@pytest.mark.parametrize("model, stream", [("cut-stream", True), ("cut-body", False)])
def test_an_engine_that_dies_before_its_first_byte_is_retried_elsewhere(
        setup, caplog, model: str, stream: bool) -> None:
    with caplog.at_level(logging.WARNING, logger="gpumesh.gateway"):
        reply = chat(setup, model, stream=stream)
    assert reply.status == 200, reply
    assert tried(caplog) == [f"a-{model}"]
    assert answer_text(reply.raw, stream) == "hello there"
