"""The gateway's own HTTP/1.1 client (mesh/gateway/upstream.py) against real servers: an
aiohttp app as engines are, and raw asyncio servers for what engines do at the edges
(answers that end with the connection, connections closed while pooled, garbage, a death
mid-answer). The gateway's tests run every relay through it as well."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, AsyncIterator, Awaitable, Callable

import pytest
from aiohttp import web

from gpumesh.mesh.gateway.upstream import (AnswerBroken, EngineUnreachable, StaleConnection,
                                            Upstream)
from harness import free_port

JSON = {"Content-Type": "application/json"}


def run(scenario: Callable[[], Awaitable[Any]]) -> Any:
    return asyncio.run(asyncio.wait_for(scenario(), 30))


@contextlib.asynccontextmanager
async def app_engine(app: web.Application) -> AsyncIterator[str]:
    """An aiohttp app served on loopback (as engines are), for the block; its URL."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def raw_engine(answer: Callable[[asyncio.StreamReader, asyncio.StreamWriter],
                                      Awaitable[None]]) -> AsyncIterator[str]:
    """A raw asyncio server answering each connection with `answer`, for the block."""
    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()


@contextlib.asynccontextmanager
async def pool() -> AsyncIterator[Upstream]:
    upstream = Upstream(5.0)
    try:
        yield upstream
    finally:
        upstream.close()


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length"))
    return head + await reader.readexactly(length)


def echo_app(connections: list[Any]) -> web.Application:
    async def echo(request: web.Request) -> web.StreamResponse:
        connections.append(request.transport)
        body = await request.read()
        return web.Response(body=body, headers={"X-Seen-Key": request.headers.get(
            "Authorization", ""), "Content-Type": request.content_type})

    async def stream(request: web.Request) -> web.StreamResponse:
        connections.append(request.transport)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)          # chunked: no length
        for i in range(3):
            await response.write(f"data: {i}\n\n".encode())
            await asyncio.sleep(0.05)
        await response.write_eof()
        return response

    async def big(request: web.Request) -> web.Response:
        return web.Response(body=bytes(range(256)) * (4 << 12))       # 4 MiB

    app = web.Application()
    app.router.add_post("/echo", echo)
    app.router.add_post("/stream", stream)
    app.router.add_post("/big", big)
    return app


def test_answers_come_whole_and_one_connection_serves_them_in_turn() -> None:
    async def scenario() -> None:
        connections: list[Any] = []
        async with app_engine(echo_app(connections)) as url, pool() as upstream:
            for i in range(3):
                answer = await upstream.post(url, "/echo", b'{"n": %d}' % i,
                                             {**JSON, "Authorization": "Bearer k"})
                assert answer.status == 200 and answer.content_length == 8
                assert answer.headers["X-Seen-Key"] == "Bearer k"
                assert await answer.read() == b'{"n": %d}' % i
                answer.release()
            assert len({id(t) for t in connections}) == 1       # kept alive, reused
            # A chunked stream arrives piece by piece, before its end.
            answer = await upstream.post(url, "/stream", b"{}", JSON)
            assert answer.content_length is None
            assert await answer.readany() == b"data: 0\n\n"
            rest = await answer.read()
            assert rest == b"data: 1\n\ndata: 2\n\n"
            answer.release()
            assert len({id(t) for t in connections}) == 1
    run(scenario)


def test_an_answer_released_unread_closes_its_connection() -> None:
    async def scenario() -> None:
        connections: list[Any] = []
        async with app_engine(echo_app(connections)) as url, pool() as upstream:
            answer = await upstream.post(url, "/stream", b"{}", JSON)
            assert await answer.readany() == b"data: 0\n\n"
            answer.release()             # the client left: the engine must stop for nobody
            answer = await upstream.post(url, "/echo", b"x", JSON)
            assert await answer.read() == b"x"
            answer.release()
            assert len({id(t) for t in connections}) == 2
            assert connections[0].is_closing()
    run(scenario)


def test_a_large_answer_read_slowly_pauses_the_engine_and_arrives_intact() -> None:
    async def scenario() -> None:
        async with app_engine(echo_app([])) as url, pool() as upstream:
            answer = await upstream.post(url, "/big", b"", JSON)
            connection = answer._connection
            await asyncio.sleep(0.3)                 # nobody reads: the engine is paused
            assert connection is not None and connection.paused
            assert answer._held < 4 << 20
            body = await answer.read()
            assert body == bytes(range(256)) * (4 << 12)
            assert not connection.paused
            answer.release()
    run(scenario)


def test_an_answer_that_ends_with_its_connection() -> None:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nall of it")
        await writer.drain()
        writer.close()

    async def scenario() -> None:
        async with raw_engine(answer) as url, pool() as upstream:
            reply = await upstream.post(url, "/v1/x", b"{}", JSON)
            assert reply.status == 200 and await reply.read() == b"all of it"
            reply.release()
            assert not upstream._idle.get(("127.0.0.1", int(url.rsplit(":", 1)[1])))
    run(scenario)


def test_a_pooled_connection_closed_by_the_engine_is_stale_and_a_fresh_one_works() -> None:
    served = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        served.append(1)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        # Keep-alive announced, but the next request finds it gone (read, then closed
        # without an answer: what an engine's idle timeout racing a request looks like).
        try:
            await reader.readuntil(b"\r\n\r\n")
        finally:
            writer.close()

    async def scenario() -> None:
        async with raw_engine(answer) as url, pool() as upstream:
            first = await upstream.post(url, "/v1/x", b"{}", JSON)
            assert await first.read() == b"ok"
            first.release()
            with pytest.raises(StaleConnection):
                await upstream.post(url, "/v1/x", b"{}", JSON)
            again = await upstream.post(url, "/v1/x", b"{}", JSON, fresh=True)
            assert await again.read() == b"ok"
            again.release()
            assert len(served) == 2
    run(scenario)


def test_a_death_mid_answer_and_an_answer_that_is_not_http_are_broken() -> None:
    async def dies(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly ten b")
        await writer.drain()
        writer.close()

    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"SSH-2.0-OpenSSH\r\n\r\n")
        await writer.drain()

    async def scenario() -> None:
        async with raw_engine(dies) as dying_url, raw_engine(garbage) as liar_url, \
                pool() as upstream:
            answer = await upstream.post(dying_url, "/v1/x", b"{}", JSON)
            assert await answer.readany() == b"only ten b"
            with pytest.raises(AnswerBroken, match="mid-answer"):
                await answer.readany()
            answer.release()
            with pytest.raises(AnswerBroken, match="not HTTP"):
                await upstream.post(liar_url, "/v1/x", b"{}", JSON)
    run(scenario)


def test_no_engine_is_unreachable_and_a_line_break_in_a_header_is_refused() -> None:
    async def scenario() -> None:
        upstream = Upstream(5.0)
        with pytest.raises(EngineUnreachable, match="cannot connect"):
            await upstream.post(f"http://127.0.0.1:{free_port()}", "/v1/x", b"{}", JSON)
        with pytest.raises(EngineUnreachable, match="not an http"):
            await upstream.post("https://127.0.0.1:1", "/v1/x", b"{}", JSON)
        with pytest.raises(ValueError, match="line break"):
            await upstream.post("http://127.0.0.1:1", "/v1/x", b"{}",
                                {"X-A": "b\r\nX-Injected: 1"})
    run(scenario)


def test_closing_an_answer_wakes_its_reader() -> None:
    """The watchdog cuts a silent engine with close(): the read waiting on it fails."""
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(10)

    async def scenario() -> None:
        async with raw_engine(silent) as url, pool() as upstream:
            answer = await upstream.post(url, "/v1/x", b"{}", JSON)
            reading = asyncio.create_task(answer.readany())
            await asyncio.sleep(0.05)
            answer.close()
            with pytest.raises(AnswerBroken, match="closed"):
                await reading
    run(scenario)


def test_bytes_after_a_whole_answer_keep_its_connection_out_of_the_pool() -> None:
    async def chatty(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nextra")   # unasked
        await writer.drain()
        await asyncio.sleep(10)

    async def scenario() -> None:
        async with raw_engine(chatty) as url, pool() as upstream:
            answer = await upstream.post(url, "/v1/x", b"{}", JSON)
            assert await answer.read() == b"ok"
            await asyncio.sleep(0.2)
            answer.release()
            assert not any(upstream._idle.values())
    run(scenario)
