"""The gateway's own HTTP/1.1 client: POST a body to an engine (or a peer's gateway) over a
kept-alive connection and read the answer as it arrives.

Why not aiohttp's ClientSession, which every other part of the daemon uses: on the hot path
it was the largest cost of a request. A session call builds a request object, a payload, a
cookie filter, a timer and trace hooks, then parses in C; measured on one core (CPU time,
sequential requests to a stand-in engine): ~178 µs per request through the session, ~60 µs
through this client, most of that the system calls both make. The gateway asks for one
thing: a POST with a few headers, on loopback or to a peer it knows, answered with a length,
chunked, or until the connection closes. That much fits here, with llhttp (through
httptools, the parser uvicorn uses) doing the parsing in C.

Errors say what the caller can do next (all are aiohttp.ClientConnectionError, as the
session's were, so the relay's handlers stay as they are):
- `EngineUnreachable`: no connection could be made (refused, timed out). The engine is not
  there; another instance may be.
- `StaleConnection`: a pooled connection was closed before any of the answer came. Engines
  close idle connections on their own schedule: this says nothing about the engine, and
  sending again on a fresh connection is safe (the engine saw no complete request).
- `AnswerBroken`: the connection failed, or sent what is not HTTP, during the answer.

A connection goes back to the pool only when its answer was read to the end and both sides
keep it alive; an answer released early closes its connection (an engine that still
generates for a client who left stops).
"""

from __future__ import annotations

import asyncio
import time
from urllib.parse import urlsplit

import aiohttp
import httptools
from multidict import CIMultiDict, CIMultiDictProxy

__all__ = ["AnswerBroken", "EngineUnreachable", "StaleConnection", "Upstream",
           "UpstreamAnswer"]

_PAUSE_AT = 1 << 20      # bytes of answer held unread before the engine's socket is paused
_RESUME_AT = 1 << 18


class EngineUnreachable(aiohttp.ClientConnectionError):
    """No connection could be made to the engine (or peer)."""


class StaleConnection(aiohttp.ClientConnectionError):
    """A pooled connection was closed before any of the answer came."""


class AnswerBroken(aiohttp.ClientConnectionError):
    """The connection failed, or sent what is not HTTP, during the answer."""


class UpstreamAnswer:
    """One answer: status and headers once they came, then the body as it arrives.

    The body is read with `readany()` (what has come, b"" at its end) or `read()` (all of
    it). `release()` hands the connection back (or closes it, if the answer was not read to
    its end); `close()` cuts it (the watchdog does, for a silent engine)."""

    __slots__ = ("url", "status", "headers", "content_length", "_connection", "_chunks",
                 "_held", "_complete", "_error", "_waiter", "_head", "_raw_headers")

    def __init__(self, url: str, connection: _Connection) -> None:
        self.url = url
        self.status = 0
        self.headers: CIMultiDictProxy[str] = _NO_HEADERS
        self.content_length: int | None = None
        self._connection: _Connection | None = connection
        self._chunks: list[bytes] = []
        self._held = 0                      # bytes in _chunks
        self._complete = False              # the whole body has come
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._head: asyncio.Future[None] = connection.loop.create_future()
        self._raw_headers: list[tuple[bytes, bytes]] = []

    async def readany(self) -> bytes:
        """What of the body has come (waits for some); b"" once it has all been read."""
        while not self._chunks:
            if self._error is not None:
                raise self._error
            if self._complete:
                return b""
            waiter = self._waiter = self._connection.loop.create_future()  # type: ignore[union-attr]
            try:
                await waiter
            finally:
                self._waiter = None
        chunks = self._chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        if self._held > _RESUME_AT and self._connection is not None:
            self._connection.resume()
        self._held = 0
        return data

    async def read(self) -> bytes:
        """The whole body."""
        parts = []
        while chunk := await self.readany():
            parts.append(chunk)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def release(self) -> None:
        """Done with this answer: its connection goes back to the pool if it was read to its
        end and may be kept, else it is closed."""
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.finished(self, reusable=self._complete and not self._chunks
                                and self._error is None)

    def close(self) -> None:
        """Cut the connection; a read waiting on it fails (AnswerBroken)."""
        self._fail(AnswerBroken("the connection to the engine was closed"))
        self.release()

    # --- fed by the connection -----------------------------------------------------------

    def _feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self._held += len(data)
        if self._held > _PAUSE_AT and self._connection is not None:
            self._connection.pause()
        self._wake()

    def _finish(self) -> None:
        self._complete = True
        self._wake()

    def _fail(self, error: BaseException) -> None:
        if self._error is None and not self._complete:
            self._error = error
        if not self._head.done():
            self._head.set_exception(error)
            self._head.exception()      # retrieved here: nobody may be waiting for it
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


_NO_HEADERS: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict())


class _Connection(asyncio.Protocol):
    """One kept-alive connection: the transport, llhttp's parser, the answer being read."""

    def __init__(self, pool: Upstream, key: tuple[str, int]) -> None:
        self.pool = pool
        self.key = key
        self.loop = pool.loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.answer: UpstreamAnswer | None = None
        self.answers = 0                 # answers begun on this connection
        self.got_bytes = False           # of the current answer
        self.closed = False
        self.paused = False
        self.idle_since = 0.0

    # --- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport       # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.answer is None or self.answer._complete:
            # Bytes nobody asked for (on an idle connection, or after a whole answer): the
            # connection cannot be trusted for another request.
            self.close()
            return
        self.got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._break(AnswerBroken("the engine switched protocols"))
        except httptools.HttpParserError as exc:
            self._break(AnswerBroken(f"the engine's answer is not HTTP: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        answer = self.answer
        if answer is None or answer._complete:
            return
        if not self.got_bytes and self.answers > 1:
            answer._fail(StaleConnection("the pooled connection was closed before the answer "
                                         "began"))
        elif (exc is None and answer._head.done() and answer.content_length is None
              and not self._chunked()):
            answer._finish()            # an answer whose end is the connection's end
        else:
            when = "mid-answer" if self.got_bytes else "before answering"
            answer._fail(AnswerBroken(f"the engine closed the connection {when}"
                                      f"{f' ({exc})' if exc else ''}"))

    # --- httptools callbacks ----------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.answer is not None:
            self.answer._raw_headers.append((name, value))

    def on_headers_complete(self) -> None:
        answer = self.answer
        if answer is None:
            return
        status = self.parser.get_status_code()
        if status < 200:               # 1xx: informational; the real answer follows
            answer._raw_headers.clear()
            return
        # As aiohttp's own client read them; a value that is not UTF-8 is never a crash.
        headers = CIMultiDict((name.decode("utf-8", "replace"), value.decode("utf-8", "replace"))
                              for name, value in answer._raw_headers)
        answer._raw_headers = []
        answer.status = status
        answer.headers = CIMultiDictProxy(headers)
        length = headers.get("Content-Length")
        answer.content_length = int(length) if length is not None and length.isdigit() else None
        if not answer._head.done():
            answer._head.set_result(None)

    def on_body(self, body: bytes) -> None:
        if self.answer is not None:
            self.answer._feed(body)

    def on_message_complete(self) -> None:
        answer = self.answer
        if answer is None or answer.status == 0:
            return                     # the end of a 1xx
        if not self.parser.should_keep_alive():
            self.closed = True         # not reused; closed once the answer is released
        answer._finish()

    # --- used by the pool and the answer ------------------------------------------------------

    def send(self, answer: UpstreamAnswer, data: bytes) -> None:
        self.answer = answer
        self.answers += 1
        self.got_bytes = False
        self.transport.write(data)      # type: ignore[union-attr]

    def finished(self, answer: UpstreamAnswer, reusable: bool) -> None:
        if self.answer is not answer:
            return
        self.answer = None
        if reusable and not self.closed and not self.paused:
            self.pool._put_back(self)
        else:
            self.close()

    def pause(self) -> None:
        if not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.paused and self.transport is not None and not self.closed:
            self.paused = False
            self.transport.resume_reading()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def _break(self, error: AnswerBroken) -> None:
        if self.answer is not None:
            self.answer._fail(error)
        self.close()

    def _chunked(self) -> bool:
        answer = self.answer
        return answer is not None and "chunked" in answer.headers.get("Transfer-Encoding", "")


class Upstream:
    """The connections to engines and peers, pooled per host and port. Owned by the gateway,
    which closes it when the app stops."""

    def __init__(self, connect_timeout_s: float, *, max_idle_per_host: int = 256,
                 idle_timeout_s: float = 15.0) -> None:
        self.connect_timeout_s = connect_timeout_s
        self.max_idle_per_host = max_idle_per_host
        self.idle_timeout_s = idle_timeout_s   # kept idle no longer (engines close sooner)
        self.loop: asyncio.AbstractEventLoop = None      # type: ignore[assignment]
        self._idle: dict[tuple[str, int], list[_Connection]] = {}
        self._addresses: dict[str, tuple[tuple[str, int], str]] = {}
        self._closed = False

    async def post(self, base_url: str, path: str, body: bytes, headers: dict[str, str], *,
                   fresh: bool = False) -> UpstreamAnswer:
        """Send the request; return once the answer's status and headers came. `fresh`: on
        a new connection, not a pooled one."""
        if self.loop is None:
            self.loop = asyncio.get_running_loop()
        key, host = self._address(base_url)
        head = _request_head(path, host, len(body), headers)
        connection = None if fresh else self._pooled(key)
        if connection is None:
            connection = await self._connect(key)
        answer = UpstreamAnswer(base_url + path, connection)
        connection.send(answer, head + body if len(body) < 65536 else head)
        if len(body) >= 65536:
            connection.transport.write(body)    # type: ignore[union-attr]
        try:
            await answer._head
        except BaseException:
            answer.close()             # cancelled (a timeout) or failed: never reused
            raise
        return answer

    def close(self) -> None:
        """Close the idle connections (those in use close with their answers)."""
        self._closed = True
        for connections in self._idle.values():
            for connection in connections:
                connection.close()
        self._idle.clear()

    # --- the pool ---------------------------------------------------------------------------

    def _pooled(self, key: tuple[str, int]) -> _Connection | None:
        idle = self._idle.get(key)
        if not idle:
            return None
        too_old = time.monotonic() - self.idle_timeout_s
        while idle:
            connection = idle.pop()             # the most recently used: least likely stale
            if not connection.closed and connection.idle_since > too_old:
                return connection
            connection.close()
        return None

    def _put_back(self, connection: _Connection) -> None:
        idle = self._idle.setdefault(connection.key, [])
        if self._closed or len(idle) >= self.max_idle_per_host:
            connection.close()
            return
        connection.idle_since = time.monotonic()
        idle.append(connection)

    async def _connect(self, key: tuple[str, int]) -> _Connection:
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                _, connection = await self.loop.create_connection(
                    lambda: _Connection(self, key), key[0], key[1])
        except TimeoutError:
            raise EngineUnreachable(f"no connection to {key[0]}:{key[1]} within "
                                    f"{self.connect_timeout_s:g} s") from None
        except OSError as exc:
            raise EngineUnreachable(f"cannot connect to {key[0]}:{key[1]}: "
                                    f"{exc.strerror or exc}") from None
        return connection

    def _address(self, base_url: str) -> tuple[tuple[str, int], str]:
        known = self._addresses.get(base_url)
        if known is None:
            parts = urlsplit(base_url)
            if parts.scheme != "http" or not parts.hostname:
                raise EngineUnreachable(f"{base_url!r} is not an http:// URL")
            port = parts.port or 80
            host = parts.hostname
            known = ((host, port), parts.netloc)
            if len(self._addresses) > 4096:       # instances come and go: bounded
                self._addresses.clear()
            self._addresses[base_url] = known
        return known


def _request_head(path: str, host: str, length: int, headers: dict[str, str]) -> bytes:
    lines = [f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {length}\r\n"]
    for name, value in headers.items():
        if "\n" in value or "\r" in value or "\n" in name or "\r" in name:
            raise ValueError(f"header {name!r} holds a line break")
        lines.append(f"{name}: {value}\r\n")
    lines.append("\r\n")
    # As aiohttp's server decoded them (UTF-8, undecodable bytes kept as surrogates).
    return "".join(lines).encode("utf-8", "surrogateescape")
