"""Remote image URLs for llama.cpp VLMs: the gateway fetches them and inlines data: URLs
(mesh/gateway/images.py), under a policy and bounds, and refuses with a 400 naming the part.

In-process nodes (one per policy: any, public, off) route to a stand-in engine that records
the body it got, served with an image server on loopback. The real engine's side (the image
reaching llama.cpp) is in tests/test_vlm.py.
"""

from __future__ import annotations

import asyncio
import base64
import os
import socket

import pytest
from aiohttp import web
from gateway_fixtures import SEEN, add_model, api_call, bootstrap, openai_style_app
from inprocess import InProcessNode, node_secret, raft_threads
from tinymodels import tiny_png, write_tiny_gguf

from gpumesh.mesh.auth import engine_key
from gpumesh.mesh.gateway import GatewaySettings
from gpumesh.mesh.gateway.images import address_allowed, image_type, remote_images

PNG = tiny_png()
CAP = 8 << 10                                 # the "any" node's image_max_bytes
NOISE = b"\x89PNG\r\n\x1a\n" + os.urandom(6 << 10)    # under the cap, incompressible
NOISE2 = b"\x89PNG\r\n\x1a\n" + os.urandom(6 << 10)
BIG = b"\x89PNG\r\n\x1a\n" + os.urandom(CAP)          # over it


def image_server() -> web.Application:
    """What the gateway fetches: images, a page, a huge answer, a silent one, redirects."""
    async def serve(request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        if name == "tiny.png":
            return web.Response(body=PNG, content_type="image/png")
        if name == "untyped":                                 # octet-stream: sniffed
            return web.Response(body=PNG)
        if name == "noise.png":
            return web.Response(body=NOISE, content_type="image/png")
        if name == "noise2.png":
            return web.Response(body=NOISE2, content_type="image/png")
        if name == "page.html":
            return web.Response(text="<html>hi</html>", content_type="text/html")
        if name == "not-an-image":
            return web.Response(body=b"just bytes")
        if name == "big.png":
            return web.Response(body=BIG, content_type="image/png")
        if name == "big-chunked.png":                         # no length: read with a bound
            response = web.StreamResponse(headers={"Content-Type": "image/png"})
            await response.prepare(request)
            for _ in range(64):
                await response.write(BIG[:1024])
            await response.write_eof()
            return response
        if name == "silent":
            await asyncio.sleep(5)                            # past the 1 s timeout
            return web.Response(body=PNG, content_type="image/png")
        if name == "moved":
            raise web.HTTPFound("/img/tiny.png")
        if name == "loop":
            raise web.HTTPFound("/img/loop")
        if name == "missing":
            raise web.HTTPNotFound()
        raise web.HTTPNotFound()

    app = web.Application()
    app.router.add_get("/img/{name}", serve)
    return app


def start_node(tmp_path_factory: pytest.TempPathFactory, policy: str,
               node_ids: tuple[str, ...], **options) -> InProcessNode:
    """A node (one gateway per id, sharing the state) whose vlm's engine runs on the last
    id, so that a request to the first gateway is inlined there and forwarded signed."""
    workdir = tmp_path_factory.mktemp(f"images-{policy}")
    gguf = write_tiny_gguf(workdir / "tiny.gguf")
    node = InProcessNode(workdir / "raft", node_ids,
                         settings=GatewaySettings(image_fetch=policy, **options.pop("gateway", {})),
                         **options)
    node.start()
    node.admin = bootstrap(node)
    engine_node = node_ids[-1]
    node.engines = {}
    for model, backend in (("vlm", "llama.cpp"), ("vlm-vllm", "vllm")):
        engine = openai_style_app(engine_key(node_secret(engine_node), f"{model}-1"))
        node.engines[model] = engine
        add_model(node, model, gguf, [(f"{model}-1", engine_node, node.serve(engine))],
                  kind="vlm")
        node.submit({"op": "update_model", "name": model, "changes": {"backend": backend}})
    node.images = f"http://127.0.0.1:{node.serve(image_server())}/img"
    return node


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory):
    started: dict[str, InProcessNode] = {}
    try:
        started["any"] = start_node(
            tmp_path_factory, "any", ("gw-a", "gw-b"), max_body_bytes=16 << 10,
            gateway={"image_max_bytes": CAP, "image_fetch_timeout_s": 1.0})
        started["public"] = start_node(tmp_path_factory, "public", ("gw-public",))
        started["off"] = start_node(tmp_path_factory, "off", ("gw-off",))
        yield started
    finally:
        for node in started.values():
            node.stop()
    assert raft_threads() == []


def image(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def chat(node: InProcessNode, content: list, model: str = "vlm", **extra):
    return api_call(node.url + "/v1/chat/completions", "POST", node.admin,
                    {"model": model, "messages": [{"role": "user", "content": content}],
                     **extra})


def seen(node: InProcessNode, model: str = "vlm") -> dict:
    return node.engines[model][SEEN][-1]["body"]


def data_url(kind: str, data: bytes) -> str:
    return f"data:{kind};base64,{base64.b64encode(data).decode()}"


# --- the address check and the scan, as functions -----------------------------------------

@pytest.mark.parametrize("address", [
    "127.0.0.1", "127.8.9.10", "::1", "169.254.169.254", "fe80::1", "fe80::1%lo",
    "0.0.0.0", "0.1.2.3", "::", "224.0.0.1", "ff02::1",
    "::ffff:127.0.0.1", "::ffff:169.254.169.254", "::127.0.0.1"])
def test_the_public_policy_refuses_local_and_metadata_addresses(address: str) -> None:
    assert not address_allowed(address)


@pytest.mark.parametrize("address", ["93.184.216.34", "8.8.8.8", "10.1.2.3", "192.168.1.5",
                                     "2606:4700:4700::1111", "::ffff:93.184.216.34"])
def test_the_public_policy_allows_routable_addresses(address: str) -> None:
    assert address_allowed(address)


def test_an_answer_is_an_image_by_its_type_or_its_first_bytes() -> None:
    assert image_type("image/jpeg; charset=binary", b"") == "image/jpeg"
    assert image_type(None, PNG) == "image/png"
    assert image_type("application/octet-stream", b"\xff\xd8\xff\xe0") == "image/jpeg"
    assert image_type("", b"GIF89a...") == "image/gif"
    assert image_type(None, b"RIFF\x00\x00\x00\x00WEBPVP8 ") == "image/webp"
    assert image_type("text/html", PNG) is None          # a declared non-image is not sniffed
    assert image_type(None, b"<html>") is None


def test_only_http_image_urls_of_list_contents_are_found() -> None:
    payload = {"messages": [
        {"role": "system", "content": "see https://example.com/a.png"},      # a string
        {"role": "user", "content": [
            {"type": "text", "text": "http://example.com/b.png"},
            image("https://example.com/c.png"), image("data:image/png;base64,AAAA"),
            {"type": "input_image", "image_url": "HTTP://example.com/d.png"},
            image("file:///etc/passwd")]}]}
    assert [(i.param, i.url) for i in remote_images(payload)] == [
        ("messages[1].content[1]", "https://example.com/c.png"),
        ("messages[1].content[3]", "HTTP://example.com/d.png")]


# --- through a gateway ----------------------------------------------------------------------

def test_a_remote_image_reaches_the_engine_inline_and_the_rest_as_sent(nodes) -> None:
    node = nodes["any"]
    content = [{"type": "text", "text": "Qu'y a-t-il ? ☃"}, image(f"{node.images}/tiny.png"),
               {"type": "input_image", "image_url": f"{node.images}/untyped"},
               image(f"{node.images}/moved"), image(f"{node.images}/tiny.png")]
    reply = chat(node, content, seed=2**70, temperature=0.5)
    assert reply.status == 200, reply
    body = seen(node)
    assert body["seed"] == 2**70 and body["temperature"] == 0.5    # an exact re-encoding
    assert body["messages"][0]["content"] == [
        content[0], image(data_url("image/png", PNG)),
        {"type": "input_image", "image_url": data_url("image/png", PNG)},     # sniffed
        image(data_url("image/png", PNG)), image(data_url("image/png", PNG))]


def test_the_inlined_body_is_forwarded_to_a_peer_signed(nodes) -> None:
    """The engine is on gw-b: gw-a inlines, then signs what it forwards."""
    node = nodes["any"]
    reply = chat(node, [image(f"{node.images}/tiny.png")], stream=True)
    assert reply.status == 200 and reply.raw.endswith(b"data: [DONE]\n\n"), reply
    assert seen(node)["messages"][0]["content"] == [image(data_url("image/png", PNG))]


def test_engines_that_fetch_urls_themselves_get_them_untouched(nodes) -> None:
    node = nodes["public"]
    content = [image("http://127.0.0.1:9/never-fetched.png")]
    assert chat(node, content, model="vlm-vllm").status == 200
    assert seen(node, "vlm-vllm")["messages"][0]["content"] == content


@pytest.mark.parametrize("name, code, words", [
    ("page.html", "image_fetch_failed", "answered text/html, not an image"),
    ("not-an-image", "image_fetch_failed", "not a PNG, JPEG, GIF or WebP"),
    ("missing", "image_fetch_failed", "answered HTTP 404"),
    ("loop", "image_fetch_failed", "more than 3 redirects"),
    ("big.png", "image_too_large", "larger (8.01 KiB) than the 8 KiB fetched per image"),
    ("big-chunked.png", "image_too_large", "larger than the 8 KiB fetched per image"),
    ("silent", "image_fetch_failed", "did not arrive within 1 s"),
])
def test_a_remote_image_that_is_not_a_fetchable_image_is_a_400(nodes, name, code, words):
    node = nodes["any"]
    before = len(node.engines["vlm"][SEEN])
    reply = chat(node, [{"type": "text", "text": "hi"}, image(f"{node.images}/{name}")])
    assert reply.status == 400, reply
    error = reply.error
    assert (error["code"], error["param"]) == (code, "messages[0].content[1]")
    assert words in error["message"] and name in error["message"], error
    assert len(node.engines["vlm"][SEEN]) == before          # the engine saw nothing


def test_images_that_would_make_the_request_too_large_are_a_400(nodes) -> None:
    """Each is under the per-image cap; together, inlined, over the 16 KiB body bound."""
    node = nodes["any"]
    reply = chat(node, [image(f"{node.images}/noise.png"), image(f"{node.images}/noise2.png")])
    assert reply.status == 400, reply
    assert reply.error["code"] == "image_too_large"
    assert "largest body a gateway takes" in reply.error["message"]
    assert chat(node, [image(f"{node.images}/noise.png")]).status == 200   # one fits


def test_at_most_eight_image_urls_per_request(nodes) -> None:
    node = nodes["any"]
    reply = chat(node, [image(f"{node.images}/tiny.png")] * 9)
    assert reply.status == 400, reply
    assert (reply.error["code"], reply.error["param"]) == ("too_many_images",
                                                           "messages[0].content[8]")


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:{port}/img/tiny.png", "http://localhost:{port}/img/tiny.png",
    "http://[::1]:{port}/img/tiny.png", "http://169.254.169.254/latest/meta-data/",
    "http://[::ffff:127.0.0.1]:{port}/img/tiny.png", "http://0.0.0.0:{port}/img/tiny.png"])
def test_the_default_policy_refuses_local_and_metadata_addresses(nodes, url) -> None:
    node = nodes["public"]
    port = node.images.split(":")[-1].split("/")[0]
    reply = chat(node, [{"type": "text", "text": "hi"}, image(url.format(port=port))])
    assert reply.status == 400, reply
    assert (reply.error["code"], reply.error["param"]) == ("image_url_not_allowed",
                                                           "messages[0].content[1]")
    assert "--image-fetch any allows it" in reply.error["message"]


def test_fetching_off_asks_for_data_urls(nodes) -> None:
    node = nodes["off"]
    reply = chat(node, [image(f"{node.images}/tiny.png")])
    assert reply.status == 400, reply
    assert (reply.error["code"], reply.error["param"]) == ("image_url_not_allowed",
                                                           "messages[0].content[0]")
    assert "data: URL" in reply.error["message"]
    assert chat(node, [image(data_url("image/png", PNG))]).status == 200    # inline still is


def test_the_connection_goes_to_the_checked_address_not_a_new_lookup() -> None:
    """DNS rebinding: the session asks no resolver but the checked addresses. A host name
    that resolves nowhere is fetched from the address pinned for it."""
    from gpumesh.mesh.gateway.images import _pinned_session

    async def fetch() -> bytes:
        runner = web.AppRunner(image_server())
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        try:
            async with _pinned_session([(socket.AF_INET, "127.0.0.1")]) as session, \
                    session.get(f"http://rebound.invalid:{port}/img/tiny.png") as answer:
                return await answer.read()
        finally:
            await runner.cleanup()

    assert asyncio.run(fetch()) == PNG
