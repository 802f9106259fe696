"""OpenAI-shaped errors: the helper, and the middleware that shapes every refusal."""

from __future__ import annotations

import asyncio
import json
import logging

from aiohttp import ClientSession, web
from aiohttp.test_utils import TestServer

from gpumesh.mesh.errors import error_middleware, openai_error


def _body(response: web.Response) -> dict:
    return json.loads(response.body)


def test_openai_error_defaults():
    response = openai_error(400, "bad input")
    assert response.status == 400
    assert response.content_type == "application/json"
    assert _body(response) == {"error": {"message": "bad input",
                                         "type": "invalid_request_error",
                                         "param": None, "code": None}}


def test_openai_error_all_fields_and_headers():
    response = openai_error(401, "invalid API key", type_="authentication_error",
                            code="invalid_api_key", param="authorization",
                            headers={"WWW-Authenticate": "Bearer"})
    assert response.status == 401
    assert response.headers["WWW-Authenticate"] == "Bearer"
    assert _body(response) == {"error": {"message": "invalid API key",
                                         "type": "authentication_error",
                                         "param": "authorization",
                                         "code": "invalid_api_key"}}


def test_openai_error_body_has_only_the_error_object():
    body = _body(openai_error(404, "no model named x", code="model_not_found"))
    assert list(body) == ["error"]
    assert set(body["error"]) == {"message", "type", "param", "code"}


def test_status_picks_the_openai_type():
    assert _body(openai_error(403, "no"))["error"]["type"] == "permission_error"
    assert _body(openai_error(503, "later"))["error"]["type"] == "server_error"
    assert _body(openai_error(429, "slow down"))["error"]["type"] == "rate_limit_error"


# --- the middleware, on a real server on loopback --------------------------------------------

async def _boom(request: web.Request) -> web.Response:
    raise RuntimeError("kaboom")


async def _echo(request: web.Request) -> web.Response:
    return web.json_response({"size": len(await request.read())})


async def _call(method: str, path: str, data: bytes | None = None) -> tuple[int, dict, dict]:
    app = web.Application(middlewares=[error_middleware], client_max_size=1024)
    app.router.add_get("/boom", _boom)
    app.router.add_post("/echo", _echo)
    async with TestServer(app, host="127.0.0.1") as server, ClientSession() as session:
        async with session.request(method, server.make_url(path), data=data) as response:
            return response.status, dict(response.headers), await response.json()


def _run(method: str, path: str, data: bytes | None = None) -> tuple[int, dict, dict]:
    return asyncio.run(_call(method, path, data))


def test_unknown_route_is_a_404_in_openai_shape():
    status, _, body = _run("GET", "/nowhere")
    assert status == 404
    assert body["error"]["message"] == "no route GET /nowhere"
    assert body["error"]["type"] == "invalid_request_error"


def test_wrong_method_is_a_405_that_says_what_is_allowed():
    status, headers, body = _run("GET", "/echo")
    assert status == 405 and "POST" in headers["Allow"]
    assert body["error"]["message"] == "GET is not allowed on /echo"


def test_oversized_body_is_a_413_naming_the_limit():
    status, _, body = _run("POST", "/echo", b"x" * 4096)
    assert status == 413 and "1024 bytes" in body["error"]["message"]
    assert _run("POST", "/echo", b"x" * 10)[2] == {"size": 10}   # within the limit: served


def test_a_bug_is_a_logged_500_without_details_leaking(caplog):
    with caplog.at_level(logging.ERROR, logger="gpumesh.http"):
        status, _, body = _run("GET", "/boom")
    assert status == 500 and body["error"]["code"] == "internal_error"
    assert "kaboom" not in body["error"]["message"]
    assert any(r.exc_info and "kaboom" in str(r.exc_info[1]) for r in caplog.records)
