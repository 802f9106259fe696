"""The OpenAI-compatible gateway, served by every node under /v1.

A request is authenticated against the replicated key hashes, routed to a running instance
of its model (least outstanding requests first, any node), and its answer is relayed byte for
byte, streamed as it arrives. The body is parsed once to find `model`, never re-encoded.

Engines listen on loopback only. An instance on this node is called directly; one on another
node is reached through that node's gateway, with the caller's own key (valid cluster-wide)
and `X-Gpumesh-Instance` naming the instance, so the peer hands it to its local engine.
Nothing reaches the client before the engine's first byte: an instance that cannot be
reached, or dies before that byte (refused, reset, a body cut short, a peer gateway that
says its instance is gone), is retried on another instance; that is what keeps requests
alive while a node or the leader dies.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from typing import Any

import aiohttp
from aiohttp import web

from .auth import hash_key, key_from_request
from .errors import openai_error
from .state import ClusterStore

__all__ = ["Gateway"]

log = logging.getLogger("gpumesh.gateway")

# Paths relayed to engines as they are. Each is an OpenAI endpoint a backend may serve.
RELAYED_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
INSTANCE_HEADER = "X-Gpumesh-Instance"
# A peer gateway's answer that says "my instance is gone, nothing was sent to the client":
# the forwarding gateway tries another instance instead of relaying the error.
RETRY_HEADER = "X-Gpumesh-Retry"
_MAX_ATTEMPTS = 3
_HOP_HEADERS = {"content-length", "transfer-encoding", "connection", "keep-alive", "server",
                "date", "content-encoding"}


class _TryAnotherInstance(Exception):
    """This instance failed before anything reached the client: another one may answer."""


class Gateway:
    def __init__(self, store: ClusterStore, node_id: str, session: aiohttp.ClientSession):
        self._store = store
        self._node_id = node_id
        self._session = session
        self._outstanding: Counter[str] = Counter()   # instance id -> requests in flight

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/v1/models", self.list_models)
        for path in RELAYED_PATHS:
            app.router.add_post(path, self.relay)

    # --- handlers --------------------------------------------------------------------------

    async def list_models(self, request: web.Request) -> web.StreamResponse:
        if (denied := self._authenticate(request)) is not None:
            return denied
        view = self._store.view
        data = [{"id": name, "object": "model", "created": int(model["created"]),
                 "owned_by": "gpumesh",
                 "ready": any(i["state"] == "running" for i in view.instances_of(name))}
                for name, model in sorted(view.models.items())]
        return web.json_response({"object": "list", "data": data})

    async def relay(self, request: web.Request) -> web.StreamResponse:
        if (denied := self._authenticate(request)) is not None:
            return denied
        body = await request.read()
        try:
            payload = json.loads(body)
            model_name = payload["model"]
            if not isinstance(model_name, str):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            return openai_error(400, "the request body must be a JSON object with a string "
                                "'model' field", param="model")
        view = self._store.view
        if model_name not in view.models:
            return openai_error(404, f"The model '{model_name}' does not exist",
                                code="model_not_found", param="model")
        candidates = self._candidates(request, model_name)
        if not candidates:
            return self._no_instance(model_name, pinned=INSTANCE_HEADER in request.headers)
        # llama.cpp closes the connection a few ms after every streamed answer, although it
        # announced keep-alive: a pooled connection would be stale for the next request.
        # Streams therefore ask for `Connection: close` and never go back to the pool.
        streamed = payload.get("stream") is True
        last_error = ""
        for instance in candidates[:_MAX_ATTEMPTS]:
            try:
                return await self._forward_with_retry(request, instance, body, streamed)
            except (aiohttp.ClientConnectionError, _TryAnotherInstance) as exc:
                # Nothing has reached the client yet.
                last_error = f"{instance['id']}: {exc}"
                log.warning("instance %s unreachable, trying another: %s", instance["id"], exc)
        return openai_error(502, f"no instance of {model_name} answered ({last_error})",
                            type_="server_error", code="upstream_unreachable",
                            headers={RETRY_HEADER: "another-instance"})

    async def _forward_with_retry(self, request: web.Request, instance: dict[str, Any],
                                  body: bytes, close_after: bool) -> web.StreamResponse:
        """Forward once more if a pooled connection turns out to be stale.

        Engines close idle keep-alive connections on their own schedule; a request that took
        such a connection from the pool fails before its first byte. That says nothing about
        the engine, so it is retried on the same instance. Failing to connect at all
        (ClientConnectorError) does say the engine is not there: no second try.
        """
        try:
            return await self._forward(request, instance, body, close_after)
        except aiohttp.ClientConnectorError:
            raise
        except aiohttp.ClientConnectionError as exc:
            log.debug("instance %s: stale pooled connection (%s); retrying", instance["id"], exc)
            return await self._forward(request, instance, body, close_after=True)

    # --- helpers ---------------------------------------------------------------------------

    def _authenticate(self, request: web.Request) -> web.Response | None:
        key = key_from_request(request)
        if key is None:
            return openai_error(401, "You didn't provide an API key. Pass it as "
                                "'Authorization: Bearer KEY'.", code="invalid_api_key")
        if self._store.view.api_key(hash_key(key)) is None:
            return openai_error(401, "Incorrect API key provided.", code="invalid_api_key")
        return None

    def _candidates(self, request: web.Request, model_name: str) -> list[dict[str, Any]]:
        """Running instances, least outstanding first; a pinned instance (from a peer) alone."""
        running = [i for i in self._store.view.instances_of(model_name)
                   if i["state"] == "running" and i.get("port")]
        pinned = request.headers.get(INSTANCE_HEADER)
        if pinned is not None:
            return [i for i in running if i["id"] == pinned and i["node_id"] == self._node_id]
        # Local instances win ties: one hop fewer.
        return sorted(running, key=lambda i: (self._outstanding[i["id"]],
                                              i["node_id"] != self._node_id, i["id"]))

    def _no_instance(self, model_name: str, pinned: bool = False) -> web.Response:
        model = self._store.view.models[model_name]
        states = Counter(i["state"] for i in self._store.view.instances_of(model_name))
        if model.get("schedule_error"):
            why = model["schedule_error"]
        elif states:
            why = "instances are " + ", ".join(f"{n} {s}" for s, n in sorted(states.items()))
        else:
            why = "no instance is scheduled yet"
        headers = {"Retry-After": "5"}
        if pinned:   # a peer's view of our instances may be a commit ahead of ours
            headers[RETRY_HEADER] = "another-instance"
        return openai_error(503, f"The model '{model_name}' has no running instance: {why}",
                            type_="server_error", code="model_not_ready", headers=headers)

    def _upstream_url(self, instance: dict[str, Any], path: str) -> tuple[str, dict[str, str]]:
        if instance["node_id"] == self._node_id:
            return f"http://127.0.0.1:{instance['port']}{path}", {}
        node = self._store.view.nodes.get(instance["node_id"], {})
        return f"{node.get('api_url')}{path}", {INSTANCE_HEADER: instance["id"]}

    async def _forward(self, request: web.Request, instance: dict[str, Any], body: bytes,
                       close_after: bool) -> web.StreamResponse:
        url, extra = self._upstream_url(instance, request.path)
        headers = {"Content-Type": "application/json", **extra}
        if close_after:   # the engine answers `Connection: close`: it never enters the pool
            headers["Connection"] = "close"
        if extra:  # a peer gateway checks the caller's key itself, however it was sent
            headers["Authorization"] = f"Bearer {key_from_request(request)}"
        self._outstanding[instance["id"]] += 1
        try:
            async with self._session.post(url, data=body, headers=headers) as upstream:
                if extra and upstream.headers.get(RETRY_HEADER):
                    raise _TryAnotherInstance(f"node {instance['node_id']}: "
                                              f"HTTP {upstream.status}, its instance is gone")
                return await self._relay_response(request, upstream)
        finally:
            self._outstanding[instance["id"]] -= 1
            if self._outstanding[instance["id"]] <= 0:
                del self._outstanding[instance["id"]]

    async def _relay_response(self, request: web.Request,
                              upstream: aiohttp.ClientResponse) -> web.StreamResponse:
        headers = {k: v for k, v in upstream.headers.items()
                   if k.lower() not in _HOP_HEADERS and k != RETRY_HEADER}
        streamed = upstream.headers.get("Content-Type", "").startswith("text/event-stream")
        try:
            # The whole body, or a stream's first chunk, before the client sees anything: an
            # engine that dies now has sent nothing the client could notice.
            first = await (upstream.content.readany() if streamed else upstream.read())
        except aiohttp.ClientError as exc:
            raise _TryAnotherInstance(f"the answer broke before its first byte: {exc}") from None
        if not streamed:
            return web.Response(status=upstream.status, body=first, headers=headers)
        response = web.StreamResponse(status=upstream.status, headers=headers)
        await response.prepare(request)
        chunk = first
        while True:
            if not chunk:
                break
            try:
                await response.write(chunk)
            except ConnectionResetError:
                # The client went away. Returning leaves `async with session.post(...)`,
                # which closes the engine's connection: it stops generating for nobody.
                log.info("client left during a stream from %s", upstream.url)
                return response
            try:
                chunk = await upstream.content.readany()
            except aiohttp.ClientError as exc:
                # The engine broke after bytes reached the client: retrying elsewhere would
                # splice two answers, and an error body cannot follow. Cut the connection so
                # the client sees a broken transfer, not a clean end of stream.
                log.warning("stream from %s broke after the first byte: %s", upstream.url, exc)
                if request.transport is not None:
                    request.transport.close()
                return response
        await response.write_eof()
        return response
