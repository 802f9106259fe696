"""What one gateway shows another when it forwards a request (auth.sign_forward), and what
someone who reads it on the wire can do with it: nothing but send that same request again
within the window.

In-process: a real single-node store and the daemon's own app served for two nodes of it
(one replicated state, one cluster secret). A third "node" is a recorder: an OpenAI-style
server registered as a node's API address, holding the only instance of a model, so the
first gateway forwards to it and the test sees exactly what went over the wire. Then the
recorded header is replayed against the second node's real gateway, as is and altered.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
from aiohttp import web
from inprocess import CLUSTER_SECRET, InProcessNode, http_request, instance_record

from gpumesh.mesh.auth import (ADMIN, FORWARD_HEADER, FORWARD_WINDOW_S, INSTANCE_HEADER,
                               check_forward, forward_key, new_api_key, sign_forward)
from gpumesh.mesh.deployments import build_model_record
from tinymodels import write_tiny_gguf

NODE, PEER, RECORDER = "node-forward", "node-forward-peer", "node-forward-recorder"
CHAT = "/v1/chat/completions"
ANSWER = {"id": "chatcmpl-rec", "object": "chat.completion", "created": 1, "model": "remote",
          "choices": [{"index": 0, "finish_reason": "stop",
                       "message": {"role": "assistant", "content": "recorded"}}],
          "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}


def recorder(seen: list[dict[str, Any]]) -> web.Application:
    async def chat(request: web.Request) -> web.Response:
        seen.append({"headers": dict(request.headers), "body": await request.read(),
                     "path": request.path})
        return web.json_response(ANSWER)
    app = web.Application()
    app.router.add_post(CHAT, chat)
    return app


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):
    workdir = tmp_path_factory.mktemp("gateway-forward")
    node = InProcessNode(workdir / "raft", (NODE, PEER))
    seen: list[dict[str, Any]] = []
    try:
        node.start()
        key, record = new_api_key("admin", ADMIN)
        node.submit({"op": "create_api_key", "key": record, "only_if_no_admin": True})
        port = node.serve(recorder(seen))
        for node_id, url in ((NODE, node.urls[0]), (PEER, node.urls[1]),
                             (RECORDER, f"http://127.0.0.1:{port}")):
            node.submit({"op": "upsert_node", "node": {
                "id": node_id, "name": node_id, "status": "ready", "api_url": url,
                "updated": time.time()}})
        spec = {"name": "remote", "source": str(write_tiny_gguf(workdir / "tiny.gguf")),
                "replicas": 1}
        node.submit({"op": "create_model", "model": build_model_record(spec)})
        node.submit({"op": "create_instance", "instance": instance_record(
            "remote-1", "remote", "running", RECORDER, port=1)})
        yield node, key, seen
    finally:
        node.stop()


def post(url: str, body: bytes, headers: dict[str, str]):
    return asyncio.run(http_request(url, "POST", data=body,
                                    headers={"Content-Type": "application/json", **headers}))


def test_a_forward_is_signed_for_its_request_and_the_client_key_stays_home(setup) -> None:
    node, key, seen = setup
    body = {"model": "remote", "messages": [{"role": "user", "content": "hi"}]}
    reply = asyncio.run(http_request(node.url + CHAT, "POST", key=key, json_body=body))
    assert reply.status == 200 and json.loads(reply.raw)["choices"][0]["message"][
        "content"] == "recorded"
    sent = seen[-1]
    assert sent["path"] == CHAT and sent["headers"][INSTANCE_HEADER] == "remote-1"
    assert "Authorization" not in sent["headers"]          # the client's key never leaves
    forward = sent["headers"][FORWARD_HEADER]
    version, stamp, digest, _ = forward.split(" ")
    assert version == "v2" and abs(int(stamp) - time.time()) < 30
    assert check_forward(forward_key(CLUSTER_SECRET), forward, CHAT, "remote-1") == digest
    assert check_forward(forward_key("another-cluster-secret"), forward, CHAT,
                         "remote-1") is None


def test_what_is_read_on_the_wire_is_worth_only_that_same_request(setup) -> None:
    node, key, seen = setup
    body = {"model": "remote", "messages": [{"role": "user", "content": "hello"}]}
    assert asyncio.run(http_request(node.url + CHAT, "POST", key=key,
                                    json_body=body)).status == 200
    sent = seen[-1]
    captured = {FORWARD_HEADER: sent["headers"][FORWARD_HEADER],
                INSTANCE_HEADER: sent["headers"][INSTANCE_HEADER]}
    peer = node.urls[1]

    # As is: accepted by the other gateway (which then has no local remote-1: 503, not 401).
    same = post(peer + CHAT, sent["body"], captured)
    assert same.status == 503 and same.error["code"] == "model_not_ready", same
    # Another body (someone else's prompt on the cluster's bill): refused.
    other = post(peer + CHAT, json.dumps({**body, "max_tokens": 4000}).encode(), captured)
    assert other.status == 401 and "not the one its gateway signed" in \
        other.error["message"]
    # Another instance, another route, the management API: the signature does not cover them.
    for path, headers in ((CHAT, {**captured, INSTANCE_HEADER: "x"}),
                          ("/v1/embeddings", captured), ("/api/keys", captured)):
        refused = post(peer + path, sent["body"], headers)
        assert refused.status == 401, (path, refused)
        assert refused.error["code"] == "invalid_api_key"


def test_a_forward_never_reaches_the_management_api_and_expires(setup) -> None:
    node, _, _ = setup
    cluster_key = forward_key(CLUSTER_SECRET)
    # Even a good signature (only the cluster's own gateways can make one) is no admin key.
    signed = sign_forward(cluster_key, "/api/keys", "", b"{}")
    refused = post(node.urls[1] + "/api/keys", b"{}", {FORWARD_HEADER: signed})
    assert refused.status == 403 and refused.error["code"] == "forbidden"
    # Outside the window (clocks that far apart, or a header kept for later): refused.
    old = sign_forward(cluster_key, CHAT, "remote-1", b"{}",
                       now=time.time() - FORWARD_WINDOW_S - 5)
    stale = post(node.urls[1] + CHAT, b"{}", {FORWARD_HEADER: old, INSTANCE_HEADER: "remote-1"})
    assert stale.status == 401 and "apart" in stale.error["message"]
    for garbage in ("", "v2", "v2 x y z", "v1 1 2 3", "v2 1 2 3 4"):
        assert check_forward(cluster_key, garbage, CHAT, "remote-1") is None
