"""The management API (mesh/api.py) over real HTTP, against a real ClusterStore.

The app is built as `Daemon.build_app` builds it (error middleware, admin middleware, the
management routes and the gateway), served by aiohttp's TestServer on loopback, and its
state lives in a real single-node pysyncobj group whose journal is in a temporary folder.
No reconciler or agent runs, so instances exist only where a test creates them.

Starting a Raft group takes about a second (its first election), so one node serves the
whole module: it runs on an event loop in a background thread, each test talks to it
with an `aiohttp.ClientSession` under `asyncio.run`, and tests use model names of their own.
Only the no-quorum test starts (and stops) a store of its own.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from inprocess import (READY_TIMEOUT, InProcessNode, Reply, http_request, new_store,
                       raft_threads)
from inprocess import instance_record as shared_instance_record
from tinymodels import write_tiny_gguf

from gpumesh import __version__
from gpumesh.mesh.auth import ADMIN, USER, new_api_key
from gpumesh.mesh.daemon import http_app
from gpumesh.mesh.deployments import build_model_record

NODE_ID = "node-api-test"
BACKENDS = [{"name": "llama.cpp", "model_formats": ["gguf"], "runs_on_cpu": True,
             "version": "test-build", "gpu_vendors": [], "available": True, "problem": None}]
RAFT_KEYS = {"self_address", "leader", "is_leader", "term", "commit_index", "last_applied",
             "has_quorum", "ready", "members", "peers", "storage_error"}


# --- a node: store + HTTP app, on an event loop in a background thread ------------------------

def instance_record(instance_id: str, model: str, state: str, *, port: int | None = None,
                    node_id: str = NODE_ID) -> dict[str, Any]:
    return shared_instance_record(instance_id, model, state, node_id, port=port)


# --- fixtures --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("models") / "tiny.gguf")


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory):
    node = InProcessNode(tmp_path_factory.mktemp("raft"), (NODE_ID,), BACKENDS,
                         started=time.time() - 5.0)
    node.start()
    yield node
    node.stop()
    assert raft_threads() == []


@pytest.fixture(scope="module")
def keys(node: InProcessNode) -> dict[str, str]:
    admin_key, admin_record = new_api_key("admin", ADMIN)
    user_key, user_record = new_api_key("someone", USER)
    node.submit({"op": "create_api_key", "key": admin_record, "only_if_no_admin": True})
    node.submit({"op": "create_api_key", "key": user_record})
    node.submit({"op": "upsert_node", "node": {
        "id": NODE_ID, "name": "zulu", "status": "ready", "api_url": node.url,
        "raft_address": node.store.status.self_address, "version": __version__,
        "backends": {"llama.cpp": {"version": "test-build", "runs_on_cpu": True,
                                   "gpu_vendors": []}},
        "updated": time.time()}})
    node.submit({"op": "upsert_node", "node": {"id": "node-b", "name": "alpha",
                                               "status": "ready", "updated": time.time()}})
    return {"admin": admin_key, "user": user_key}


@pytest.fixture()
def api(node: InProcessNode, keys: dict[str, str]):
    """`api(method, path, key="admin"|"user"|None|<literal>, json_body=…, data=…)`."""
    def call(method: str, path: str, key: str | None = "admin", **kwargs: Any) -> Reply:
        return asyncio.run(http_request(node.url + path, method, key=keys.get(key, key),
                                        **kwargs))
    return call


def deploy(node: InProcessNode, gguf: Path, name: str, replicas: int = 1) -> dict[str, Any]:
    """A model record committed straight to the store (as POST /api/models would)."""
    record = build_model_record({"name": name, "source": str(gguf), "replicas": replicas})
    node.submit({"op": "create_model", "model": record})
    return record


# --- open and protected routes ---------------------------------------------------------------

def test_health_needs_no_key(api) -> None:
    for key in (None, "gm-bogus-key", "user", "admin"):
        reply = api("GET", "/api/health", key=key)
        assert reply.status == 200, (key, reply)
        assert reply.body == {"status": "ok", "version": __version__}


@pytest.mark.parametrize("path", ["/api/status", "/api/nodes", "/api/backends", "/api/models",
                                  "/api/models/anything", "/api/instances"])
def test_every_other_route_needs_an_admin_key(api, path: str) -> None:
    missing = api("GET", path, key=None)
    assert missing.status == 401
    assert missing.error["code"] == "invalid_api_key"
    assert missing.error["type"] == "invalid_request_error"

    wrong = api("GET", path, key="gm-00000000-not-a-real-key")
    assert wrong.status == 401 and wrong.error["code"] == "invalid_api_key"

    user = api("GET", path, key="user")
    assert user.status == 403
    assert user.error["type"] == "permission_error"
    assert user.error["code"] == "forbidden"
    assert "admin" in user.error["message"]


def test_admin_key_is_accepted_as_bearer_or_x_api_key(api, keys) -> None:
    assert api("GET", "/api/status").status == 200
    by_header = api("GET", "/api/status", key=None, headers={"X-API-Key": keys["admin"]})
    assert by_header.status == 200
    # The scheme is case-insensitive, surrounding blanks are ignored.
    lower = api("GET", "/api/status", key=None,
                headers={"Authorization": f"bearer  {keys['admin']} "})
    assert lower.status == 200


def test_writes_need_an_admin_key_too(api, gguf) -> None:
    spec = {"name": "never-created", "source": str(gguf)}
    assert api("POST", "/api/models", key=None, json_body=spec).status == 401
    assert api("POST", "/api/models", key="user", json_body=spec).status == 403
    assert api("PATCH", "/api/models/x", key="user", json_body={"replicas": 1}).status == 403
    assert api("DELETE", "/api/models/x", key=None).status == 401
    assert api("GET", "/api/models/never-created").status == 404


# --- read routes: shapes ---------------------------------------------------------------------

def test_status_shape(api, node) -> None:
    reply = api("GET", "/api/status")
    assert reply.status == 200
    body = reply.body
    assert set(body) == {"version", "node_id", "cluster_id", "uptime_s", "leader", "term",
                         "quorum", "members", "raft", "counts"}
    assert body["version"] == __version__
    assert body["cluster_id"] is None                 # served without a cluster identity
    assert body["leader"]["raft_address"] == node.store.status.self_address
    assert body["quorum"] is True and body["term"] == body["raft"]["term"] >= 1
    assert [m["raft_address"] for m in body["members"]] == [node.store.status.self_address]
    assert body["members"][0]["role"] == "leader"
    assert body["node_id"] == NODE_ID
    assert 5.0 <= body["uptime_s"] < 600
    raft = body["raft"]
    assert set(raft) == RAFT_KEYS
    assert raft["is_leader"] and raft["has_quorum"] and raft["ready"]
    assert raft["leader"] == raft["self_address"] == node.store.status.self_address
    assert raft["members"] == [raft["self_address"]]
    view = node.store.view
    assert body["counts"] == {"nodes": len(view.nodes), "models": len(view.models),
                              "instances": len(view.instances)}
    assert body["counts"]["nodes"] == 2


def test_nodes_are_listed_by_name(api, node) -> None:
    reply = api("GET", "/api/nodes")
    assert reply.status == 200
    data = reply.body["data"]
    assert [n["name"] for n in data] == ["alpha", "zulu"]
    zulu = data[1]
    assert zulu == {**node.store.view.nodes[NODE_ID], "state": "ready", "role": "leader"}
    assert zulu["id"] == NODE_ID and zulu["api_url"] == node.url
    assert zulu["backends"]["llama.cpp"]["runs_on_cpu"] is True


def test_backends_are_this_nodes_own_list(api) -> None:
    reply = api("GET", "/api/backends")
    assert reply.status == 200
    assert reply.body == {"data": BACKENDS}


def test_models_and_instances_lists(api, node, gguf) -> None:
    deploy(node, gguf, "list-b", replicas=2)
    deploy(node, gguf, "list-a", replicas=1)
    node.submit({"op": "create_instance",
                 "instance": instance_record("list-b-2", "list-b", "running", port=1)})
    node.submit({"op": "create_instance",
                 "instance": instance_record("list-b-1", "list-b", "starting")})

    models = api("GET", "/api/models")
    assert models.status == 200
    data = models.body["data"]
    names = [m["name"] for m in data]
    assert names == sorted(names)
    assert {"list-a", "list-b"} <= set(names)
    b = next(m for m in data if m["name"] == "list-b")
    stored = node.store.view.models["list-b"]
    assert {k: v for k, v in b.items()
            if k not in ("status", "instances", "ready_replicas")} == stored
    assert b["status"] == "deploying"
    assert b["ready_replicas"] == 1
    assert [i["id"] for i in b["instances"]] == ["list-b-1", "list-b-2"]   # sorted by id
    a = next(m for m in data if m["name"] == "list-a")
    assert a["instances"] == [] and a["ready_replicas"] == 0

    instances = api("GET", "/api/instances")
    assert instances.status == 200
    listed = instances.body["data"]
    ids = [i["id"] for i in listed]
    assert ids == sorted(ids)
    assert {"list-b-1", "list-b-2"} <= set(ids)
    assert next(i for i in listed if i["id"] == "list-b-2") == \
        node.store.view.instances["list-b-2"]


# --- POST /api/models ----------------------------------------------------------------------------

def test_create_model_returns_201_deploying_and_the_record_is_replicated(api, node, gguf) -> None:
    before = time.time()
    reply = api("POST", "/api/models", json_body={"name": "created", "source": str(gguf),
                                                  "replicas": 2, "context_length": 128,
                                                  "args": ["--flash-attn", "off"]})
    assert reply.status == 201, reply
    body = reply.body
    assert body["name"] == "created"
    assert body["status"] == "deploying"        # no reconciler here: no instance yet
    assert body["instances"] == [] and body["ready_replicas"] == 0
    assert body["replicas"] == 2 and body["context_length"] == 128
    assert body["args"] == ["--flash-attn", "off"]
    assert body["backend"] == "llama.cpp" and body["format"] == "gguf"
    assert body["source"] == {"kind": "local", "path": str(gguf.resolve())}
    assert body["schedule_error"] is None
    assert body["estimate"]["total_bytes"] > gguf.stat().st_size
    assert before <= body["created"] <= time.time()

    stored = node.store.view.models["created"]
    assert stored == {k: v for k, v in body.items()
                      if k not in ("status", "instances", "ready_replicas")}
    again = api("GET", "/api/models/created")
    assert again.status == 200 and again.body == body


def test_create_model_with_an_existing_name_is_409(api, node, gguf) -> None:
    deploy(node, gguf, "taken", replicas=3)
    reply = api("POST", "/api/models", json_body={"name": "taken", "source": str(gguf)})
    assert reply.status == 409
    assert reply.error["code"] == "model_exists"
    assert "taken" in reply.error["message"]
    assert node.store.view.models["taken"]["replicas"] == 3     # the first one is untouched


@pytest.mark.parametrize("raw", [b"{not json", b"", b"\xff\xfe\x00garbage"])
def test_create_model_body_that_is_not_json_is_400(api, raw: bytes) -> None:
    reply = api("POST", "/api/models", data=raw,
                headers={"Content-Type": "application/json"})
    assert reply.status == 400, reply
    assert reply.error["type"] == "invalid_request_error"
    assert "JSON" in reply.error["message"]


@pytest.mark.parametrize("body", [[{"name": "x"}], "a string", 42, None])
def test_create_model_body_that_is_not_an_object_is_400(api, body) -> None:
    reply = api("POST", "/api/models", data=json.dumps(body).encode(),
                headers={"Content-Type": "application/json"})
    assert reply.status == 400, reply
    assert "JSON object" in reply.error["message"]


@pytest.mark.parametrize("spec, param", [
    ({"name": "p1", "source": "/no/such/dir/model.gguf"}, "source"),
    ({"name": "p2", "source": "./missing.gguf"}, "source"),
    ({"name": "p3"}, "source"),
    ({"name": "p4", "source": "GGUF", "backend": "vllm-nope"}, "backend"),
    ({"name": "p5", "source": "GGUF", "replicas": -1}, "replicas"),
    ({"name": "p6", "source": "GGUF", "replicas": 65}, "replicas"),
    ({"name": "p7", "source": "GGUF", "replicas": "2"}, "replicas"),
    ({"name": "p8", "source": "GGUF", "replicas": True}, "replicas"),
    ({"name": "p9", "source": "GGUF", "replicas": 1.5}, "replicas"),
    ({"name": "-bad name", "source": "GGUF"}, "name"),
    ({"name": "", "source": "GGUF"}, "name"),
    ({"name": "p10", "source": "GGUF", "context_length": 0}, "context_length"),
    ({"name": "p11", "source": "GGUF", "args": "--flag"}, "args"),
])
def test_create_model_invalid_spec_is_400_naming_the_param(api, node, gguf, spec, param) -> None:
    spec = {k: (str(gguf) if v == "GGUF" else v) for k, v in spec.items()}
    reply = api("POST", "/api/models", json_body=spec)
    assert reply.status == 400, reply
    assert reply.error["param"] == param
    assert reply.error["code"] == "invalid_deployment"
    assert spec.get("name") not in node.store.view.models


def test_create_model_unknown_backend_lists_the_known_ones(api, gguf) -> None:
    reply = api("POST", "/api/models", json_body={"name": "nb", "source": str(gguf),
                                                  "backend": "nope"})
    assert reply.status == 400
    assert reply.error["param"] == "backend"
    assert "nope" in reply.error["message"] and "llama.cpp" in reply.error["message"]


# --- GET / PATCH / DELETE /api/models/{name} ---------------------------------------------------

def test_get_unknown_model_is_404(api) -> None:
    reply = api("GET", "/api/models/ghost")
    assert reply.status == 404
    assert reply.error["code"] == "model_not_found"
    assert "ghost" in reply.error["message"]


def test_model_names_with_slashes_route_to_the_model(api, node, gguf) -> None:
    deploy(node, gguf, "org/tiny:q4", replicas=1)
    reply = api("GET", "/api/models/org/tiny:q4")
    assert reply.status == 200 and reply.body["name"] == "org/tiny:q4"
    patched = api("PATCH", "/api/models/org/tiny:q4", json_body={"replicas": 0})
    assert patched.status == 200 and patched.body["status"] == "stopped"
    deleted = api("DELETE", "/api/models/org/tiny:q4")
    assert deleted.status == 200 and deleted.body["deleted"] == "org/tiny:q4"


def test_patch_replicas_is_replicated(api, node, gguf) -> None:
    record = deploy(node, gguf, "scaled", replicas=1)
    reply = api("PATCH", "/api/models/scaled", json_body={"replicas": 4})
    assert reply.status == 200, reply
    assert reply.body["replicas"] == 4 and reply.body["status"] == "deploying"
    stored = node.store.view.models["scaled"]
    assert stored == {**record, "replicas": 4}
    assert api("GET", "/api/models/scaled").body["replicas"] == 4

    zero = api("PATCH", "/api/models/scaled", json_body={"replicas": 0})
    assert zero.status == 200 and zero.body["status"] == "stopped"
    assert node.store.view.models["scaled"]["replicas"] == 0


@pytest.mark.parametrize("body, param", [
    ({"replicas": 2, "backend": "llama.cpp"}, "backend,replicas"),
    ({"name": "renamed"}, "name"),
    ({}, ""),
])
def test_patch_anything_but_replicas_is_400(api, node, gguf, body, param) -> None:
    if "fixed" not in node.store.view.models:
        deploy(node, gguf, "fixed", replicas=1)
    reply = api("PATCH", "/api/models/fixed", json_body=body)
    assert reply.status == 400, reply
    assert reply.error["param"] == param
    assert "replicas" in reply.error["message"]
    assert node.store.view.models["fixed"]["replicas"] == 1
    assert node.store.view.models["fixed"]["name"] == "fixed"


@pytest.mark.parametrize("replicas", [-1, 65, "3", None, True, 2.0])
def test_patch_bad_replicas_is_400(api, node, gguf, replicas) -> None:
    if "fixed2" not in node.store.view.models:
        deploy(node, gguf, "fixed2", replicas=1)
    reply = api("PATCH", "/api/models/fixed2", json_body={"replicas": replicas})
    assert reply.status == 400, reply
    assert reply.error["param"] == "replicas"
    assert node.store.view.models["fixed2"]["replicas"] == 1


def test_patch_body_not_a_json_object_is_400(api, node, gguf) -> None:
    for raw in (b"nope", b"[1]"):
        reply = api("PATCH", "/api/models/whatever", data=raw,
                    headers={"Content-Type": "application/json"})
        assert reply.status == 400, reply


def test_patch_and_delete_unknown_model_are_404(api) -> None:
    patched = api("PATCH", "/api/models/ghost", json_body={"replicas": 2})
    assert patched.status == 404 and patched.error["code"] == "model_not_found"
    deleted = api("DELETE", "/api/models/ghost")
    assert deleted.status == 404 and deleted.error["code"] == "model_not_found"


def test_delete_removes_the_model_and_its_instances(api, node, gguf) -> None:
    deploy(node, gguf, "doomed", replicas=2)
    deploy(node, gguf, "survivor", replicas=1)
    node.submit({"op": "create_instance",
                 "instance": instance_record("doomed-1", "doomed", "running", port=1)})
    node.submit({"op": "create_instance",
                 "instance": instance_record("doomed-2", "doomed", "error")})
    node.submit({"op": "create_instance",
                 "instance": instance_record("survivor-1", "survivor", "running", port=2)})

    reply = api("DELETE", "/api/models/doomed")
    assert reply.status == 200, reply
    assert reply.body == {"deleted": "doomed", "instances_removed": 2}
    view = node.store.view
    assert "doomed" not in view.models
    assert not [i for i in view.instances.values() if i["model"] == "doomed"]
    assert "survivor" in view.models and "survivor-1" in view.instances
    assert api("GET", "/api/models/doomed").status == 404
    assert "doomed-1" not in [i["id"] for i in api("GET", "/api/instances").body["data"]]
    again = api("DELETE", "/api/models/doomed")
    assert again.status == 404


def test_restart_records_the_request_for_the_owning_node(api, node, gguf) -> None:
    deploy(node, gguf, "restartable")
    node.submit({"op": "create_instance", "instance": instance_record(
        "restartable-1", "restartable", "running", port=3, node_id="node-b")})
    reply = api("POST", "/api/instances/restartable-1/restart")
    assert reply.status == 202, reply
    assert reply.body == {"restarting": "restartable-1", "model": "restartable",
                          "node_id": "node-b", "node": "alpha", "node_status": "ready",
                          "restart_generation": 1}
    assert node.store.view.instances["restartable-1"]["restart_generation"] == 1
    assert node.store.view.instances["restartable-1"]["state"] == "running"  # the owner acts
    missing = api("POST", "/api/instances/ghost/restart")
    assert missing.status == 404 and missing.error["code"] == "instance_not_found"
    assert api("POST", "/api/instances/restartable-1/restart", key="user").status == 403


# --- model_summary: status ---------------------------------------------------------------------

def test_model_status_values(api, node, gguf) -> None:
    def status(name: str) -> str:
        reply = api("GET", f"/api/models/{name}")
        assert reply.status == 200, reply
        return reply.body["status"]

    deploy(node, gguf, "st-stopped", replicas=0)
    assert status("st-stopped") == "stopped"

    deploy(node, gguf, "st-deploying", replicas=2)
    node.submit({"op": "create_instance",
                 "instance": instance_record("st-deploying-1", "st-deploying", "running",
                                             port=1)})
    node.submit({"op": "create_instance",
                 "instance": instance_record("st-deploying-2", "st-deploying", "starting")})
    assert status("st-deploying") == "deploying"      # 1 of 2 running, nothing wrong

    deploy(node, gguf, "st-running", replicas=2)
    for n in (1, 2):
        node.submit({"op": "create_instance",
                     "instance": instance_record(f"st-running-{n}", "st-running", "scheduled")})
        node.submit({"op": "update_instance", "id": f"st-running-{n}", "node_id": NODE_ID,
                     "changes": {"state": "running", "port": 40000 + n}})
    body = api("GET", "/api/models/st-running").body
    assert body["status"] == "running" and body["ready_replicas"] == 2
    assert [i["port"] for i in body["instances"]] == [40001, 40002]

    deploy(node, gguf, "st-unschedulable", replicas=1)
    node.submit({"op": "update_model", "name": "st-unschedulable",
                 "changes": {"schedule_error": "node zulu: needs 9 GiB, 1 GiB free"}})
    body = api("GET", "/api/models/st-unschedulable").body
    assert body["status"] == "unschedulable"
    assert body["schedule_error"] == "node zulu: needs 9 GiB, 1 GiB free"

    deploy(node, gguf, "st-error", replicas=1)
    node.submit({"op": "create_instance",
                 "instance": instance_record("st-error-1", "st-error", "starting")})
    assert status("st-error") == "deploying"
    node.submit({"op": "update_instance", "id": "st-error-1", "node_id": NODE_ID,
                 "changes": {"state": "error", "reason": "engine exited with status 1"}})
    body = api("GET", "/api/models/st-error").body
    assert body["status"] == "error"
    assert body["instances"][0]["reason"] == "engine exited with status 1"

    # Enough running replicas wins over a stale schedule_error; scaling to 0 wins over all,
    # but a model is "stopping", not "stopped", while any of its instances is left.
    node.submit({"op": "update_model", "name": "st-running",
                 "changes": {"schedule_error": "stale"}})
    assert status("st-running") == "running"
    node.submit({"op": "update_model", "name": "st-error", "changes": {"replicas": 0}})
    assert status("st-error") == "stopping"
    node.submit({"op": "delete_instance", "id": "st-error-1"})
    assert status("st-error") == "stopped"

    listed = {m["name"]: m["status"] for m in api("GET", "/api/models").body["data"]}
    assert {k: v for k, v in listed.items() if k.startswith("st-")} == {
        "st-stopped": "stopped", "st-deploying": "deploying", "st-running": "running",
        "st-unschedulable": "unschedulable", "st-error": "stopped"}


# --- errors outside the handlers ---------------------------------------------------------------

def test_unknown_routes_and_methods_are_openai_shaped(api) -> None:
    outside = api("GET", "/nope", key=None)
    assert outside.status == 404
    assert outside.error["message"] == "no route GET /nope"
    assert outside.error["type"] == "invalid_request_error"

    # Under /api an unknown route is still behind the admin check.
    assert api("GET", "/api/nope", key=None).status == 401
    inside = api("GET", "/api/nope")
    assert inside.status == 404 and inside.error["message"] == "no route GET /api/nope"

    wrong_method = api("PUT", "/api/models", json_body={})
    assert wrong_method.status == 405
    assert wrong_method.error["message"] == "PUT is not allowed on /api/models"
    assert set(wrong_method.headers["Allow"].split(",")) >= {"GET", "POST"}


# --- no quorum: a store stopped under a running server -----------------------------------------

def test_writes_answer_503_no_quorum_once_the_store_is_stopped(tmp_path, gguf) -> None:
    raft_threads_before = raft_threads()   # the module's node has one of its own

    async def main() -> None:
        store = new_store(tmp_path)
        await store.start()
        session = aiohttp.ClientSession()
        server = TestServer(http_app(store, NODE_ID, session, time.time(), lambda: BACKENDS),
                            host="127.0.0.1")
        try:
            await store.wait_ready(READY_TIMEOUT)
            key, record = new_api_key("admin", ADMIN)
            await store.submit({"op": "create_api_key", "key": record})
            await store.submit({"op": "create_model", "model": build_model_record(
                {"name": "kept", "source": str(gguf)})})
            await server.start_server()
            url = f"http://127.0.0.1:{server.port}"

            ok = await http_request(url + "/api/models", "POST", key=key,
                                json_body={"name": "before", "source": str(gguf)})
            assert ok.status == 201, ok

            await store.stop()     # the server keeps running; writes can no longer commit

            for method, path, body in (
                    ("POST", "/api/models", {"name": "after", "source": str(gguf)}),
                    ("PATCH", "/api/models/kept", {"replicas": 3}),
                    ("DELETE", "/api/models/kept", None)):
                reply = await http_request(url + path, method, key=key, json_body=body)
                assert reply.status == 503, (method, reply)
                assert reply.error["code"] == "no_quorum"
                assert reply.error["type"] == "server_error"
                assert "cannot accept writes" in reply.error["message"]
                assert reply.headers["Retry-After"] == "2"

            # Reads are served from the last state this node applied; the key still works.
            models = await http_request(url + "/api/models", "GET", key=key)
            assert models.status == 200
            assert [m["name"] for m in models.body["data"]] == ["before", "kept"]
            assert models.body["data"][1]["replicas"] == 1
            health = await http_request(url + "/api/health", "GET")
            assert health.status == 200
        finally:
            await server.close()
            await session.close()
            await store.stop()
    asyncio.run(main())
    assert raft_threads() == raft_threads_before      # this store's tick thread was joined
