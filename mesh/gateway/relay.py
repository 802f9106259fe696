"""Relaying one engine answer to the client: bytes as they come, usage read on the way.

A plain answer is relayed as one body (large or unsized ones, e.g. generated audio, chunk
by chunk). A server-sent-event stream is relayed chunk by chunk; the gateway looks only at
chunks that mention `"usage"` (the engine's last one: the gateway asks streams for it), so
the usual chunk costs a substring test. When the client did not ask for usage, that chunk is
kept from it. Chunks that do not end an event are held until the event is whole, so an
event is never judged (or dropped) by halves.

`Exchange` records what one request did (status, tokens, first byte, which instance), for
the limiter, the meter and the metrics. `StreamWatchdog` cuts streams whose engine has sent
nothing for too long: a hung engine must not hold a client forever.

Times are `time.monotonic()` (the clock of asyncio's loop.time()), read directly: on Python
3.11 every `asyncio.get_running_loop()` makes a getpid() system call.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from typing import Any, Awaitable, Callable

import aiohttp
from aiohttp import web

from .endpoints import fast_loads
from .upstream import UpstreamAnswer

__all__ = ["EngineTimeout", "Exchange", "RETRY_HEADER", "StreamBroken", "StreamWatchdog", "TryAnotherInstance",
           "relay_answer", "usage_of"]

log = logging.getLogger("gpumesh.gateway")

# A peer gateway's answer that says "my instance is gone, nothing was sent to the client":
# the forwarding gateway tries another instance instead of relaying the error.
RETRY_HEADER = "X-Gpumesh-Retry"
# (Content-Encoding passes: the body is relayed as it came, compressed or not.)
_HOP_HEADERS = {"content-length", "transfer-encoding", "connection", "keep-alive", "server",
                "date", "x-gpumesh-instance", RETRY_HEADER.lower()}
_BUFFERED_MAX = 4 << 20        # plain answers up to this size are relayed as one body
_EVENT_ENDS = (b"\n\n", b"\r\n\r\n")
_DONE_EVENTS = (b"data: [DONE]\n\n", b"data: [DONE]\r\n\r\n")    # a stream's last event
_DECODER = json.JSONDecoder()
_NO_CHOICES = re.compile(rb'"choices"\s*:\s*\[\s*\]')   # the usage-only event


class Exchange:
    """What one request did, filled in as it goes."""

    __slots__ = ("started", "first_chunk_at", "last_read_at", "status", "prompt_tokens",
                 "completion_tokens", "instance", "served_by", "sent", "upstream", "timed_out",
                 "usage_seen", "strip_usage", "rewrite", "streamed", "carried_tokens", "task")

    def __init__(self, started: float) -> None:
        self.started = started
        self.first_chunk_at: float | None = None
        self.last_read_at = started
        self.status = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.instance: str | None = None
        self.served_by: str | None = None
        self.sent: list[bytes] | None = None    # kept only where a stream can be continued
        self.upstream: UpstreamAnswer | None = None
        self.timed_out = False
        self.usage_seen = False
        self.strip_usage = False
        self.rewrite: Callable[[dict[str, Any]], dict[str, Any] | None] | None = None
        self.streamed = False
        self.carried_tokens = 0      # sent by an engine that died before reporting usage
        self.task: asyncio.Task[Any] | None = None     # cancelled if no answer comes in time

    def take_usage(self, usage: Any) -> None:
        if isinstance(usage, dict):
            self.usage_seen = True
            self.prompt_tokens += _int(usage.get("prompt_tokens"))
            self.completion_tokens += _int(usage.get("completion_tokens"))


class EngineTimeout(Exception):
    """The engine took the request but did not begin its answer in time."""


class TryAnotherInstance(Exception):
    """This instance failed before anything reached the client: another one may answer."""


class StreamBroken(Exception):
    """The engine's stream ended abnormally after the client got its first bytes."""

    def __init__(self, response: web.StreamResponse, reason: str) -> None:
        super().__init__(reason)
        self.response = response


def usage_of(body: bytes) -> dict[str, Any] | None:
    """The (last) `usage` object of a JSON answer, read without parsing the rest of it."""
    at = body.rfind(b'"usage"')
    if at < 0:
        return None
    # Usually `{…}` right after the colon, holding numbers and small objects: its end is
    # found by counting braces, and only it is parsed.
    opening = _USAGE_OBJECT.match(body, at)
    if opening is not None:
        start = opening.end() - 1
        end = _object_end(body, start)
        if end > 0:
            try:
                usage = fast_loads(body[start:end])
            except (ValueError, RecursionError):
                pass             # a brace inside a string fooled the count: read it slowly
            else:
                return usage if type(usage) is dict else None
    colon = body.find(b":", at + 7)
    if colon < 0:
        return None
    try:
        text = body[colon + 1:colon + 1 + 4096].decode("utf-8", "replace").lstrip()
        usage, _ = _DECODER.raw_decode(text)
    except ValueError:
        return None
    return usage if isinstance(usage, dict) else None


_USAGE_OBJECT = re.compile(rb'"usage"\s*:\s*\{')


def _object_end(data: bytes, start: int) -> int:
    """Just past the `}` closing the object that opens at `start` (braces counted, strings
    not looked at), or -1."""
    depth, at = 1, start + 1
    while depth:
        close = data.find(b"}", at)
        if close < 0:
            return -1
        depth += data.count(b"{", at, close) - 1
        at = close + 1
    return at


def response_headers(upstream: UpstreamAnswer, instance: str) -> dict[str, str]:
    headers = {k: v for k, v in upstream.headers.items() if k.lower() not in _HOP_HEADERS}
    headers["X-Gpumesh-Instance"] = instance
    return headers


def relay_answer(request: web.Request, upstream: UpstreamAnswer,
                 exchange: Exchange,
                 response: web.StreamResponse | None = None) -> Awaitable[web.StreamResponse]:
    """Relay `upstream` to the client; into `response` when a continued stream goes on.
    (A plain function that hands back the coroutine doing it: one frame less per wake-up.)"""
    exchange.status = upstream.status
    is_stream = upstream.headers.get("Content-Type", "").startswith("text/event-stream")
    if response is not None and (upstream.status != 200 or not is_stream):
        raise StreamBroken(response, f"the continuation was refused ({upstream.status})")
    if is_stream:
        return _relay_stream(request, upstream, exchange, response)
    length = upstream.content_length
    if length is None or length > _BUFFERED_MAX:
        return _relay_unsized(request, upstream, exchange)
    return _relay_body(upstream, exchange)


async def _relay_body(upstream: UpstreamAnswer, exchange: Exchange) -> web.Response:
    try:
        # The whole body before the client sees anything: an engine that dies now has sent
        # nothing the client could notice.
        body = await upstream.read()
    except aiohttp.ClientError as exc:
        raise TryAnotherInstance(f"the answer broke before its first byte: {exc}") from None
    exchange.first_chunk_at = time.monotonic()
    if upstream.status < 400:
        exchange.take_usage(usage_of(body))
    return web.Response(status=upstream.status, body=body,
                        headers=response_headers(upstream, exchange.instance or ""))


async def _relay_unsized(request: web.Request, upstream: UpstreamAnswer,
                         exchange: Exchange) -> web.StreamResponse:
    first = await _first_chunk(upstream)
    exchange.first_chunk_at = time.monotonic()
    response = web.StreamResponse(status=upstream.status,
                                  headers=response_headers(upstream, exchange.instance or ""))
    await response.prepare(request)
    await response.write(first)
    while chunk := await upstream.readany():
        await response.write(chunk)
    await response.write_eof()
    return response


async def _first_chunk(upstream: UpstreamAnswer) -> bytes:
    try:
        return await upstream.readany()
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        raise TryAnotherInstance(f"the answer broke before its first byte: {exc}") from None


async def _relay_stream(request: web.Request, upstream: UpstreamAnswer,
                        exchange: Exchange,
                        response: web.StreamResponse | None) -> web.StreamResponse:
    if response is None:
        # The first chunk before the client sees anything (as for a plain answer).
        chunk = await _first_chunk(upstream)
        if exchange.timed_out:
            raise TryAnotherInstance("the engine sent nothing for too long")
        response = web.StreamResponse(status=upstream.status,
                                      headers=response_headers(upstream, exchange.instance or ""))
        await response.prepare(request)
    else:
        chunk = await _next_chunk(upstream, exchange, response)
    pending = b""
    slow = exchange.rewrite is not None          # a continuation: every event is rewritten
    sent = exchange.sent
    read, write = upstream.readany, response.write
    if chunk and exchange.first_chunk_at is None:
        exchange.first_chunk_at = time.monotonic()
    # Per chunk: a timestamp for the watchdog, a substring test, a write, a read.
    while chunk:
        exchange.last_read_at = time.monotonic()
        if pending or slow or b'"usage"' in chunk or not chunk.endswith(_EVENT_ENDS):
            pending += chunk
            cut = _last_event_end(pending)
            if cut < 0:
                chunk = b""
            else:
                chunk, pending = _events(pending[:cut], exchange), pending[cut:]
        if chunk:
            if sent is not None:
                sent.append(chunk)
            try:
                if not pending and chunk.endswith(_DONE_EVENTS):
                    # The stream's last event: it goes out with the end of the answer, in
                    # one write (a send less per stream), then the engine's answer is read
                    # to its end so that its connection goes back to the pool.
                    await response.write_eof(chunk)
                    await _drain(upstream)
                    return response
                await write(chunk)
            except ConnectionResetError:
                # The client went away. The caller releases the engine's answer unread,
                # which closes its connection: it stops generating for nobody.
                log.info("client left during a stream from %s", upstream.url)
                return response
        try:                  # _next_chunk, inline: no coroutine per chunk
            chunk = await read()
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise StreamBroken(response, str(exc) or type(exc).__name__) from None
        if exchange.timed_out:
            raise StreamBroken(response, "the engine sent nothing for too long")
    if pending:
        await write(_events(pending, exchange) if slow else pending)
    await response.write_eof()
    return response


async def _drain(upstream: UpstreamAnswer) -> None:
    """Read what an engine sends after its stream's `[DONE]` (normally just the end of the
    answer). The client has its whole answer: a failure now is nobody's concern, and the
    caller's release() then closes the connection instead of pooling it."""
    try:
        while extra := await upstream.readany():
            log.debug("instance answered %d byte(s) after [DONE]; not relayed", len(extra))
    except (aiohttp.ClientError, asyncio.TimeoutError):
        pass


async def _next_chunk(upstream: UpstreamAnswer, exchange: Exchange,
                      response: web.StreamResponse) -> bytes:
    """The next chunk; b"" at the end; StreamBroken if the engine failed or went silent."""
    try:
        chunk = await upstream.readany()
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        raise StreamBroken(response, str(exc) or type(exc).__name__) from None
    if exchange.timed_out:
        raise StreamBroken(response, "the engine sent nothing for too long")
    return chunk


def _last_event_end(data: bytes) -> int:
    """The index just past the last complete event in `data`, or -1."""
    lf = data.rfind(b"\n\n")
    crlf = data.rfind(b"\r\n\r\n")
    return max(lf + 2 if lf >= 0 else -1, crlf + 4 if crlf >= 0 else -1)


def _events(data: bytes, exchange: Exchange) -> bytes:
    """Whole events: usage read (and kept from the client if it did not ask), rewritten
    when this is a continuation on another replica."""
    if exchange.rewrite is not None:
        return _rewritten(data, exchange)
    # The usual case: only the event(s) naming "usage" are looked at, found in place. Such
    # an event is one `data:` line of JSON, parsed whole (it is small); anything else
    # (several lines, not JSON) has its `usage` object found and parsed alone.
    at = data.find(b'"usage"')
    while at >= 0:
        start = _event_start(data, at)
        end = _event_end(data, at)
        event = _event_object(data, start, end)
        if event is not None:
            usage = event.get("usage")
            no_choices = event.get("choices") == []
        else:
            usage = usage_of(data[at:end])
            no_choices = _NO_CHOICES.search(data, start, end) is not None
        if usage:
            exchange.take_usage(usage)
            if exchange.strip_usage and no_choices:
                data = data[:start] + data[end:]
                end = start
        at = data.find(b'"usage"', end)
    return data


def _event_object(data: bytes, start: int, end: int) -> dict[str, Any] | None:
    """The JSON object of the one-line `data:` event at data[start:end], or None."""
    if not data.startswith(b"data:", start) or data.find(b"\n", start, end) < end - 3:
        return None        # not a data line, or more lines than its own end
    try:
        event = fast_loads(data[start + 5:end])
    except (ValueError, RecursionError):
        return None
    return event if type(event) is dict else None


def _event_start(data: bytes, at: int) -> int:
    lf, crlf = data.rfind(b"\n\n", 0, at), data.rfind(b"\r\n\r\n", 0, at)
    return max(lf + 2 if lf >= 0 else 0, crlf + 4 if crlf >= 0 else 0)


def _event_end(data: bytes, at: int) -> int:
    lf, crlf = data.find(b"\n\n", at), data.find(b"\r\n\r\n", at)
    if lf < 0:
        return crlf + 4 if crlf >= 0 else len(data)
    return min(lf + 2, crlf + 4) if crlf >= 0 else lf + 2


def _rewritten(data: bytes, exchange: Exchange) -> bytes:
    out: list[bytes] = []
    assert exchange.rewrite is not None
    for event in data.replace(b"\r\n", b"\n").split(b"\n\n"):
        if not event:
            continue
        obj = _event_json(event)
        if obj is not None:
            if obj.get("usage"):
                exchange.take_usage(obj["usage"])
                if exchange.strip_usage and not obj.get("choices"):
                    continue
            obj = exchange.rewrite(obj)
            if obj is None:
                continue
            event = b"data: " + json.dumps(obj, separators=(",", ":")).encode()
        out.append(event + b"\n\n")
    return b"".join(out)


def _event_json(event: bytes) -> dict[str, Any] | None:
    if not event.startswith(b"data:"):
        return None
    data = event[5:].strip()
    if data == b"[DONE]":
        return None
    try:
        obj = json.loads(data)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


class StreamWatchdog:
    """Cuts requests whose engine has been silent too long: `response_s` before its answer
    begins, `idle_s` between chunks after that. A hung engine must not hold a client forever.

    One task per node looks at every request in flight once a second, instead of a timer per
    request or per chunk on the hot path (a timer costs more than the rest of a request's
    bookkeeping): a request pays one timestamp per chunk and a set insertion.
    """

    def __init__(self, response_s: float, idle_s: float) -> None:
        self.response_s = response_s
        self.idle_s = idle_s
        self._watched: set[Exchange] = set()

    def watch(self, exchange: Exchange, now: float, task: asyncio.Task[Any] | None) -> None:
        """From the moment the request is sent to this instance (`now`: time.monotonic());
        `task` is the request's, cancelled if the answer does not begin in time."""
        exchange.last_read_at = now
        exchange.timed_out = False              # a new attempt (another instance)
        exchange.task = task
        self._watched.add(exchange)

    def forget(self, exchange: Exchange) -> None:
        self._watched.discard(exchange)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(min(1.0, self.idle_s / 2, self.response_s / 2))
            now = time.monotonic()
            for exchange in list(self._watched):
                waiting = exchange.upstream is None        # no answer headers yet
                silent = now - exchange.last_read_at
                if exchange.timed_out or silent <= (self.response_s if waiting
                                                    else self.idle_s):
                    continue
                exchange.timed_out = True
                if waiting:
                    if exchange.task is not None:
                        exchange.task.cancel()      # the request's await turns into a 504
                else:
                    log.warning("instance %s sent nothing for %.0f s; cutting its answer",
                                exchange.instance, silent)
                    exchange.upstream.close()       # type: ignore[union-attr]
