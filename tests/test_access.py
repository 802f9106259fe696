"""Users, API keys and the auth middleware, through the official `openai` client (sync and
async) and the management API, on an in-process node (two gateways sharing one real Raft
store stand in for two nodes) in front of a real llama.cpp engine that checks its own key.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import openai
import pytest
from gateway_fixtures import CHAT, GRAMMAR, LlamaEngine, start_engines
from inprocess import InProcessNode, http_request, instance_record, node_secret, raft_threads
from tinymodels import write_tiny_gguf

from gpumesh.mesh.auth import ADMIN, engine_key, hash_key, new_api_key, new_user
from gpumesh.mesh.cli import main as cli_main
from gpumesh.mesh.deployments import build_model_record

NODE = "node-access"
PEER = "node-access-peer"
REVOKE_WITHIN_S = 1.0


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("access")


@pytest.fixture(scope="module")
def node(workdir: Path):
    node = InProcessNode(workdir / "raft", (NODE, PEER))
    node.start()
    yield node
    node.stop()
    assert raft_threads() == []


@pytest.fixture(scope="module")
def engine(workdir: Path):
    gguf = write_tiny_gguf(workdir / "tiny.gguf")
    engine = LlamaEngine(gguf, workdir / "engine.log",
                         api_key=engine_key(node_secret(NODE), "tiny-1"))
    start_engines(engine)
    yield engine
    engine.stop()


def api(node: InProcessNode, method: str, path: str, key: str | None, body: Any = None,
        url: str | None = None):
    return asyncio.run(http_request((url or node.url) + path, method, key=key, json_body=body))


@pytest.fixture(scope="module")
def keys(node: InProcessNode, engine: LlamaEngine, workdir: Path) -> dict[str, Any]:
    """The first admin (as the daemon mints it), then everything else through the API."""
    admin_key, record = new_api_key("admin", ADMIN, user="admin")
    node.submit({"op": "create_api_key", "key": record, "only_if_no_admin": True,
                 "create_user": new_user("admin", ADMIN)})
    for node_id, url in ((NODE, node.url), (PEER, node.urls[1])):
        node.submit({"op": "upsert_node", "node": {"id": node_id, "name": node_id,
                                                   "status": "ready", "api_url": url}})
    for name in ("tiny", "other"):
        node.submit({"op": "create_model", "model": build_model_record(
            {"name": name, "source": str(workdir / "tiny.gguf")})})
    node.submit({"op": "create_instance", "instance": instance_record(
        "tiny-1", "tiny", "running", NODE, port=engine.port)})
    assert api(node, "POST", "/api/users", admin_key, {"name": "alice"}).status == 201

    def create(**body: Any) -> str:
        reply = api(node, "POST", "/api/keys", admin_key, {"user": "alice", **body})
        assert reply.status == 201, reply
        return reply.body["key"]

    expired_key, expired = new_api_key("old", "user", user="alice", expires=time.time() - 1)
    node.submit({"op": "create_api_key", "key": expired})
    return {"admin": admin_key, "alice": create(name="laptop"),
            "only_other": create(name="other-only", models=["other"]),
            "expired": expired_key}


def client(node: InProcessNode, key: str, url: str | None = None) -> openai.OpenAI:
    """A client with `key`; with "" its calls send no key at all (see `no_key`)."""
    return openai.OpenAI(base_url=(url or node.url) + "/v1", api_key=key or "unused",
                         max_retries=0, timeout=30)


def no_key(key: str) -> dict[str, Any]:
    """The official client always sends its key, unless the header is omitted per call."""
    return {} if key else {"Authorization": openai.omit}


def chat(c: openai.OpenAI, model: str = "tiny") -> str:
    reply = c.chat.completions.create(model=model, messages=CHAT, max_tokens=16,
                                      extra_body={"grammar": GRAMMAR},
                                      extra_headers=no_key(c.api_key if c.api_key != "unused"
                                                           else ""))
    return reply.choices[0].message.content or ""


# --- the auth matrix through the openai client -------------------------------------------------

def test_the_auth_matrix_through_the_sync_client(node, keys) -> None:
    assert chat(client(node, keys["admin"])) == "hello there"
    assert chat(client(node, keys["alice"])) == "hello there"
    for key, code in (("", "invalid_api_key"), ("gm-00000000-nope", "invalid_api_key"),
                      (keys["expired"], "invalid_api_key")):
        with pytest.raises(openai.AuthenticationError) as refused:
            chat(client(node, key))
        assert refused.value.status_code == 401 and refused.value.code == code
    with pytest.raises(openai.AuthenticationError, match="expired"):
        client(node, keys["expired"]).models.list()
    with pytest.raises(openai.PermissionDeniedError) as denied:
        chat(client(node, keys["only_other"]))
    assert denied.value.code == "model_not_allowed"
    # A key limited to some models lists only those.
    assert [m.id for m in client(node, keys["only_other"]).models.list()] == ["other"]
    assert {m.id for m in client(node, keys["alice"]).models.list()} == {"tiny", "other"}


def test_the_auth_matrix_through_the_async_client(node, keys) -> None:
    async def outcome(key: str, model: str = "tiny") -> str:
        async with openai.AsyncOpenAI(base_url=node.urls[1] + "/v1", api_key=key or "unused",
                                      max_retries=0, timeout=30) as c:
            try:
                reply = await c.chat.completions.create(
                    model=model, messages=CHAT, max_tokens=16, extra_body={"grammar": GRAMMAR},
                    extra_headers=no_key(key))
            except openai.APIStatusError as exc:
                return f"{exc.status_code} {exc.code}"
            return reply.choices[0].message.content or ""

    async def main() -> list[str]:
        return await asyncio.gather(
            outcome(keys["admin"]), outcome(keys["alice"]), outcome(""),
            outcome("gm-00000000-nope"), outcome(keys["expired"]),
            outcome(keys["only_other"]), outcome(keys["alice"], "no-such-model"))

    assert asyncio.run(main()) == [
        "hello there", "hello there", "401 invalid_api_key", "401 invalid_api_key",
        "401 invalid_api_key", "403 model_not_allowed", "404 model_not_found"]


def test_a_user_key_reads_only_about_itself_under_api(node, keys) -> None:
    alice = keys["alice"]
    for method, path in (("GET", "/api/models"), ("GET", "/api/users"), ("POST", "/api/keys"),
                         ("GET", "/api/status"), ("DELETE", "/api/keys/whatever")):
        reply = api(node, method, path, alice, {} if method == "POST" else None)
        assert reply.status == 403, (path, reply)
        assert reply.error["code"] == "forbidden"
    me = api(node, "GET", "/api/me", alice)
    assert me.status == 200 and me.body["user"] == {"id": "alice", "role": "user",
                                                   "limits": None}
    own = api(node, "GET", "/api/keys", alice).body["data"]
    assert {k["user"] for k in own} == {"alice"} and len(own) >= 3
    everyone = api(node, "GET", "/api/keys", keys["admin"]).body["data"]
    assert {k["user"] for k in everyone} >= {"alice", "admin"}
    usage = api(node, "GET", "/api/usage?user=admin", alice)
    assert usage.status == 200 and usage.body["filters"]["user"] == "alice"


def test_a_key_is_shown_once_and_stored_only_as_its_hash(node, keys) -> None:
    created = api(node, "POST", "/api/keys", keys["admin"],
                  {"user": "alice", "name": "once", "expires_in_s": 3600})
    assert created.status == 201, created
    key = created.body["key"]
    assert key.startswith(f"gm-{created.body['id']}-")
    assert 3590 < created.body["expires"] - time.time() <= 3600
    listed = api(node, "GET", "/api/keys", keys["admin"])
    assert key not in listed.raw.decode() and hash_key(key) not in listed.raw.decode()
    stored = node.store.view.api_keys[hash_key(key)]
    assert key not in json.dumps(stored) and stored["user"] == "alice"
    assert chat(client(node, key)) == "hello there"


def test_revoking_a_key_refuses_it_on_every_node_within_a_second(node, keys) -> None:
    """Both gateways share the replicated state (in-process: one Raft store; see the report
    for real nodes): the revoke answers once committed, and each node refuses the key from
    the moment it applied the command."""
    created = api(node, "POST", "/api/keys", keys["admin"], {"user": "alice", "name": "doomed"})
    key, key_id = created.body["key"], created.body["id"]
    for url in node.urls:
        assert api(node, "GET", "/v1/models", key, url=url).status == 200
    started = time.monotonic()
    assert api(node, "DELETE", f"/api/keys/{key_id}", keys["admin"]).body == {"revoked": key_id}
    refused_after: dict[str, float] = {}
    while len(refused_after) < len(node.urls) and time.monotonic() - started < 5:
        for url in node.urls:
            if url not in refused_after and api(node, "GET", "/v1/models", key,
                                                url=url).status == 401:
                refused_after[url] = time.monotonic() - started
    assert len(refused_after) == len(node.urls), refused_after
    assert max(refused_after.values()) < REVOKE_WITHIN_S, refused_after
    again = api(node, "DELETE", f"/api/keys/{key_id}", keys["admin"])
    assert again.status == 404 and again.error["code"] == "key_not_found"


def test_removing_a_user_removes_its_keys_and_the_last_admin_stays(node, keys) -> None:
    admin = keys["admin"]
    assert api(node, "POST", "/api/users", admin, {"name": "bob", "role": "user",
                                                   "limits": {"rpm": 5}}).status == 201
    duplicate = api(node, "POST", "/api/users", admin, {"name": "bob"})
    assert duplicate.status == 409 and duplicate.error["code"] == "user_exists"
    bob_key = api(node, "POST", "/api/keys", admin, {"user": "bob"}).body["key"]
    assert api(node, "GET", "/v1/models", bob_key).status == 200
    removed = api(node, "DELETE", "/api/users/bob", admin)
    assert removed.body == {"deleted": "bob", "keys_removed": 1}
    assert api(node, "GET", "/v1/models", bob_key).status == 401
    # The cluster always keeps someone who can manage it.
    admin_key_id = api(node, "GET", "/api/me", admin).body["key"]["id"]
    last_key = api(node, "DELETE", f"/api/keys/{admin_key_id}", admin)
    assert last_key.status == 409 and last_key.error["code"] == "last_admin_key"
    last_user = api(node, "DELETE", "/api/users/admin", admin)
    assert last_user.status == 409 and last_user.error["code"] == "last_admin"
    assert api(node, "GET", "/api/me", admin).status == 200


@pytest.mark.parametrize("body, param", [
    ({"name": "x", "role": "root"}, "role"), ({"name": "-bad"}, "name"), ({"name": 5}, "name"),
    ({"name": "x", "limits": {"rpm": 0}}, "limits"), ({"name": "x", "limits": {"rps": 1}},
                                                      "limits")])
def test_bad_users_are_400_and_store_nothing(node, keys, body, param) -> None:
    before = dict(node.store.view.users)
    reply = api(node, "POST", "/api/users", keys["admin"], body)
    assert reply.status == 400 and reply.error["param"] == param, reply
    assert node.store.view.users == before


@pytest.mark.parametrize("body, param", [
    ({"user": "nobody"}, "user"), ({"user": "alice", "models": []}, "models"),
    ({"user": "alice", "expires": 1.0}, "expires"), ({"user": "alice", "expires_in_s": -5},
                                                     "expires_in_s"),
    ({"user": "alice", "limits": {"tpm": "lots"}}, "limits")])
def test_bad_keys_are_400_and_store_nothing(node, keys, body, param) -> None:
    before = len(node.store.view.api_keys)
    reply = api(node, "POST", "/api/keys", keys["admin"], body)
    assert reply.status == 400 and reply.error["param"] == param, reply
    assert len(node.store.view.api_keys) == before


# --- engine keys and gateway-to-gateway calls --------------------------------------------------

def test_the_engine_refuses_anyone_but_its_gateway(node, keys, engine) -> None:
    body = {"model": "tiny", "messages": CHAT, "max_tokens": 4}
    direct = asyncio.run(http_request(engine.url + "/v1/chat/completions", "POST",
                                      json_body=body))
    assert direct.status == 401                                # no key: the engine says no
    with_admin_key = asyncio.run(http_request(engine.url + "/v1/chat/completions", "POST",
                                              key=keys["admin"], json_body=body))
    assert with_admin_key.status == 401                        # a cluster key is not its key
    assert chat(client(node, keys["alice"])) == "hello there"  # the gateway has it
    # Through the peer: it forwards with the cluster's token; this node adds the engine key.
    assert chat(client(node, keys["alice"], url=node.urls[1])) == "hello there"


def test_only_gateways_and_admins_may_pin_an_instance(node, keys) -> None:
    body = {"model": "tiny", "messages": CHAT, "max_tokens": 4}
    pinned = {"X-Gpumesh-Instance": "tiny-1"}
    assert asyncio.run(http_request(node.url + "/v1/chat/completions", "POST",
                                    key=keys["admin"], json_body=body,
                                    headers=pinned)).status == 200
    user = asyncio.run(http_request(node.url + "/v1/chat/completions", "POST",
                                    key=keys["alice"], json_body=body, headers=pinned))
    assert user.status == 403 and user.error["code"] == "forbidden"
    forged = asyncio.run(http_request(node.url + "/v1/chat/completions", "POST",
                                      json_body=body, headers={**pinned,
                                                               "X-Gpumesh-Forward": "forged"}))
    assert forged.status == 401 and forged.error["code"] == "invalid_api_key"


# --- the CLI ------------------------------------------------------------------------------------

def test_cli_users_and_keys(node, keys, capsys) -> None:
    common = ["--url", node.url, "--api-key", keys["admin"]]

    def run(*argv: str) -> tuple[int, str]:
        code = cli_main([*argv, *common])
        return code, capsys.readouterr().out

    assert run("users", "add", "carol", "--rpm", "30")[0] == 0
    code, listed = run("users", "ls")
    assert code == 0 and "carol" in listed and "rpm 30" in listed
    code, out = run("keys", "create", "--user", "carol", "--name", "ci", "--expires", "30d",
                    "--models", "tiny", "--json")
    created = json.loads(out)
    assert code == 0 and created["user"] == "carol" and created["models"] == ["tiny"]
    assert 29 * 86400 < created["expires"] - time.time() <= 30 * 86400
    assert chat(client(node, created["key"])) == "hello there"
    code, listed = run("keys", "ls", "--user", "carol")
    assert code == 0 and created["id"] in listed and created["key"] not in listed
    assert run("keys", "revoke", created["id"])[0] == 0
    assert api(node, "GET", "/v1/models", created["key"]).status == 401
    assert cli_main(["keys", "revoke", "nope", *common]) == 3      # not found
    assert "no API key" in capsys.readouterr().err
    assert run("users", "rm", "carol")[0] == 0
