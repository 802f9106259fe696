"""Engine logs over HTTP from any node: the owner serves its files (rotated ones included),
another node proxies to it with the caller's key; follow streams new lines and ends when the
instance is removed. Two nodes' apps on one real store, over real HTTP (in-process)."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest
from aiohttp import web

from harness import free_port
from inprocess import InProcessNode, http_request, instance_record
from tinymodels import write_tiny_gguf

from gpumesh.mesh.auth import ADMIN, new_api_key
from gpumesh.mesh.daemon import http_app
from gpumesh.mesh.deployments import build_model_record
from gpumesh.mesh.runtimes.logfile import RotatingLog


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("logs")
    node = InProcessNode(root / "raft", ("unused",))
    node.start()
    logs_a = root / "a-logs"
    urls = {}
    for node_id, log_dir in (("node-a", logs_a), ("node-b", root / "b-logs")):
        app = http_app(node.store, node_id, node.session, time.time(), lambda: [],
                       log_dir=log_dir)
        urls[node_id] = f"http://127.0.0.1:{node.serve(app)}"
    key, record = new_api_key("admin", ADMIN)
    node.submit({"op": "create_api_key", "key": record, "only_if_no_admin": True})
    for node_id, url in urls.items():
        node.submit({"op": "upsert_node", "node": {"id": node_id, "name": node_id,
                                                   "status": "ready", "api_url": url}})
    model = build_model_record({"name": "m", "source": str(write_tiny_gguf(root / "m.gguf"))})
    node.submit({"op": "create_model", "model": model})
    node.submit({"op": "create_instance", "instance": instance_record("i-1", "m", "running",
                                                                      "node-a")})
    log = RotatingLog(logs_a / "i-1.log", max_bytes=200, keep=2)
    for i in range(12):
        log.write(f"engine line {i:02d} {'.' * 20}\n".encode())   # rotates twice
    yield node, urls, key, log
    log.close()
    node.stop()


def test_the_owner_serves_the_tail_across_rotated_files(cluster) -> None:
    node, urls, key, _ = cluster
    reply = asyncio.run(http_request(urls["node-a"] + "/api/instances/i-1/logs?tail=5", "GET",
                                     key=key))
    assert reply.status == 200 and reply.headers["Content-Type"].startswith("text/plain")
    assert [ln.split()[2] for ln in reply.raw.decode().splitlines()] == ["07", "08", "09", "10", "11"]


def test_another_node_proxies_to_the_owner_with_the_callers_key(cluster) -> None:
    node, urls, key, _ = cluster
    reply = asyncio.run(http_request(urls["node-b"] + "/api/instances/i-1/logs?tail=2", "GET",
                                     key=key))
    assert reply.status == 200
    assert reply.raw.decode().splitlines()[-1].startswith("engine line 11")
    refused = asyncio.run(http_request(urls["node-b"] + "/api/instances/i-1/logs", "GET",
                                       key="gm-0000-wrong"))
    assert refused.status == 401


def test_a_follower_that_leaves_ends_the_follow_quietly(cluster, caplog) -> None:
    """A client gone mid-follow (Ctrl-C on `gpumesh logs -f`) is how a follow usually ends:
    not an 'unhandled error' with a traceback in the daemon's log. Served the daemon's way
    (aiohttp's AppRunner, whose handlers run on after the client left: TestServer cancels
    them, which hid this)."""
    node, urls, key, log = cluster
    handlers: list[web.Request] = []

    @web.middleware
    async def track(request: web.Request, handler):     # noqa: ANN001
        handlers.append(request)
        try:
            return await handler(request)
        finally:
            handlers.remove(request)

    async def serve() -> tuple[web.AppRunner, int]:
        app = http_app(node.store, "node-a", node.session, time.time(), lambda: [],
                       log_dir=log.path.parent)
        app.middlewares.insert(0, track)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        return runner, site._server.sockets[0].getsockname()[1]   # type: ignore[union-attr]
    runner, port = node.call(serve())
    try:
        async def leave() -> None:
            async with aiohttp.ClientSession() as session:
                async with session.get(f"http://127.0.0.1:{port}/api/instances/i-1/logs"
                                       "?tail=0&follow=1",
                                       headers={"Authorization": f"Bearer {key}"}) as reply:
                    assert reply.status == 200
                    log.write(b"seen before leaving\n")
                    await asyncio.wait_for(reply.content.readline(), 10)
        with caplog.at_level("ERROR", logger="gpumesh.http"):
            asyncio.run(leave())
            deadline = time.monotonic() + 20
            while handlers:                     # its next write finds the client gone
                assert time.monotonic() < deadline, "the follow went on after its client left"
                log.write(b"written after the client left\n")
                time.sleep(0.3)
        assert not [r for r in caplog.records if r.name == "gpumesh.http"], caplog.text
    finally:
        node.call(runner.cleanup())


def test_follow_streams_new_lines_and_ends_when_the_instance_goes(cluster) -> None:
    node, urls, key, log = cluster

    async def follow() -> bytes:
        async with aiohttp.ClientSession() as session:
            async with session.get(urls["node-b"] + "/api/instances/i-1/logs?tail=0&follow=1",
                                   headers={"Authorization": f"Bearer {key}"}) as reply:
                assert reply.status == 200
                log.write(b"a new line\n")
                first = await asyncio.wait_for(reply.content.readline(), 10)
                await asyncio.to_thread(node.submit, {"op": "delete_model", "name": "m"})
                rest = await asyncio.wait_for(reply.content.read(), 10)   # the stream ends
                return first + rest

    assert asyncio.run(follow()) == b"a new line\n"


def test_an_unreachable_owner_is_a_502_that_names_it(cluster) -> None:
    node, urls, key, _ = cluster
    node.submit({"op": "upsert_node", "node": {"id": "node-c", "name": "node-c",
                                               "status": "ready",
                                               "api_url": f"http://127.0.0.1:{free_port()}"}})
    model = build_model_record({"name": "m2", "source": str(node.directory.parent / "m.gguf")})
    node.submit({"op": "create_model", "model": model})
    node.submit({"op": "create_instance", "instance": instance_record("i-2", "m2", "running",
                                                                      "node-c")})
    reply = asyncio.run(http_request(urls["node-a"] + "/api/instances/i-2/logs", "GET", key=key))
    assert reply.status == 502 and reply.error["code"] == "node_unreachable"
    assert "node-c" in reply.error["message"]
