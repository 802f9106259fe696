"""The OpenAI-compatible gateway, served by every node under /v1.

A request arrives authenticated (mesh/auth.py put its `Principal` on it). The gateway finds
the model in the body, checks the key may use it and the model's kind serves the route,
admits it under the key's and user's limits (then inlines the image URLs of a chat for an
engine that cannot fetch them: images.py), routes it to a running instance (least
outstanding requests first, any node), and relays the answer byte for byte, streamed as it
arrives. Then it settles: the limiter learns the tokens, the meter counts the request, the
metrics observe it.

Engines listen on loopback and check a per-instance key that only this node can compute.
An instance on another node is reached through that node's gateway, with
`X-Gpumesh-Instance` naming the instance and a forward signature made for this one request
(auth.sign_forward): the peer checks the body is the one signed, hands it to its engine and
does nothing else (this node has limited and will meter it). Before the first byte, a
refused connection, an answer that breaks before its first byte, or a peer that says its
instance is gone (`X-Gpumesh-Retry`) moves to the next instance (nothing has reached the
client: this is what keeps requests alive while a node or the leader dies), and a stale
pooled connection is retried once on the same instance. After it, a broken stream is
continued on another replica where the request allows it (failover.py), else the client's
connection is cut.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, AsyncIterator

import aiohttp
from aiohttp import web

from gpumesh.modelfiles.kinds import kind_serves

from ..activation import ACTIVATION, Activation
from ..auth import (FORWARD_HEADER, FORWARDED_BODY, PRINCIPAL, Principal,
                    body_digest, sign_forward)
from ..errors import openai_error
from ..limits import Limiter, Refusal, Ticket
from ..metering import Meter
from ..metrics import GatewayMetrics
from ..state import ClusterStore
from .endpoints import (CHAT, RERANK, ENDPOINTS, Endpoint, ask_for_usage, exact_payload,
                        image_part, plain_documents, read_model)
from .failover import can_continue, continuation
from .images import ImageFetcher, ImageRefused
from .relay import (RETRY_HEADER, EngineTimeout, Exchange, StreamBroken, StreamWatchdog,
                    TryAnotherInstance, relay_answer)
from .routing import INSTANCE_HEADER, ModelRoute, RouteTable, Target
from .upstream import StaleConnection, Upstream, UpstreamAnswer

__all__ = ["Gateway", "GatewaySettings"]

log = logging.getLogger("gpumesh.gateway")


@dataclass(frozen=True)
class GatewaySettings:
    connect_timeout_s: float = 5.0        # to an engine or a peer gateway
    response_timeout_s: float = 600.0     # an engine's silence before its answer begins
    stream_idle_timeout_s: float = 120.0  # an engine's silence between stream chunks
    max_attempts: int = 3                 # instances tried before the first byte
    # Remote image URLs for engines that cannot fetch them (llama.cpp; images.py): "off",
    # "public" (not to loopback, link-local, unspecified, multicast) or "any".
    image_fetch: str = "public"
    image_max_bytes: int = 20 << 20       # per image
    image_fetch_timeout_s: float = 10.0   # all of a request's images
    max_images: int = 8                   # image URLs fetched per request


class Gateway:
    def __init__(self, store: ClusterStore, node_id: str, *, routes: RouteTable,
                 forward_key: bytes, limiter: Limiter, meter: Meter, metrics: GatewayMetrics,
                 settings: GatewaySettings, max_body_bytes: int = 32 << 20) -> None:
        self._store = store
        self._node_id = node_id
        self._routes = routes
        self._forward_key = forward_key
        self._limiter = limiter
        self._meter = meter
        self._metrics = metrics
        self._settings = settings
        self._outstanding: dict[str, int] = {}     # instance id -> requests in flight
        self._loop: asyncio.AbstractEventLoop | None = None     # the app's, once it runs
        self._activation: Activation | None = None               # the app's, once it runs
        self._watchdog = StreamWatchdog(settings.response_timeout_s,
                                        settings.stream_idle_timeout_s)
        self._upstream = Upstream(settings.connect_timeout_s)
        self._images = ImageFetcher(settings.image_fetch, max_bytes=settings.image_max_bytes,
                                    timeout_s=settings.image_fetch_timeout_s,
                                    max_images=settings.max_images)
        self._max_body_bytes = max_body_bytes     # a peer's gateway takes as much (inlining)
        self._endpoints = {e.path: e for e in ENDPOINTS}

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/v1/models", self.list_models)
        for endpoint in ENDPOINTS:
            app.router.add_post(endpoint.path, self.relay)
        app.router.add_get("/metrics", self._metrics.handle)
        app.cleanup_ctx.append(self._background)

    async def _background(self, app: web.Application) -> AsyncIterator[None]:
        """The watchdog and the meter's folds run while the app does; the last fold runs
        when it stops (after the site stopped taking requests), and the pooled connections
        to engines and peers close."""
        self._loop = asyncio.get_running_loop()
        self._activation = app.get(ACTIVATION)
        tasks = [asyncio.create_task(self._watchdog.run(), name="stream-watchdog"),
                 asyncio.create_task(self._meter.run(), name="usage-folds")]
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self._meter.stop()
            self._upstream.close()

    # --- handlers --------------------------------------------------------------------------

    async def list_models(self, request: web.Request) -> web.StreamResponse:
        principal = request[PRINCIPAL]
        view = self._store.view
        data = [{"id": name, "object": "model", "created": int(model["created"]),
                 "owned_by": "gpumesh", "kind": model.get("kind") or "llm",
                 "ready": any(i["state"] == "running" for i in view.instances_of(name))}
                for name, model in sorted(view.models.items()) if principal.may_use(name)]
        return web.json_response({"object": "list", "data": data})

    async def relay(self, request: web.Request) -> web.StreamResponse:
        endpoint = self._endpoints[request.path]
        principal = request[PRINCIPAL]
        started = time.monotonic()
        body = await request.read()
        if principal.is_node and body_digest(body) != request[FORWARDED_BODY]:
            return openai_error(401, "the forwarded body is not the one its gateway signed",
                                code="invalid_api_key")
        parsed = read_model(endpoint, body, request.headers.get("Content-Type", ""))
        if type(parsed) is not tuple:
            return parsed           # a 400
        model_name, payload = parsed
        route = self._routes.route(model_name)
        if route is None:
            return openai_error(404, f"The model '{model_name}' does not exist",
                                code="model_not_found", param="model")
        if not principal.may_use(model_name):
            return openai_error(403, f"This API key may not use the model '{model_name}'",
                                code="model_not_allowed", param="model")
        if not kind_serves(route.kind, endpoint.upstream):
            return openai_error(400, f"The model '{model_name}' is a {route.kind or 'llm'} "
                                f"model: it does not serve {endpoint.path}",
                                code="wrong_model_kind", param="model")
        if endpoint.upstream == CHAT and route.kind != "vlm" and payload is not None \
                and (where := image_part(payload)) is not None:
            # The engine would answer a 500 ("image input is not supported"): it is the
            # request that is wrong for this model, and the client should hear so.
            return openai_error(400, f"The model '{model_name}' is a {route.kind or 'llm'} "
                                "model: it does not take images (a vlm does: a GGUF deployed "
                                "with its mmproj*.gguf beside it, or a vision model's folder)",
                                code="image_input_not_supported", param=where)
        activation = self._activation or request.app[ACTIVATION]
        if activation.note(model_name):         # asleep (scaled to zero): wake it, wait
            await activation.wake(model_name)
            route = self._routes.route(model_name) or route
        targets = self._targets(request, principal, route)
        if type(targets) is not list:
            return targets          # a 403 or 503
        if principal.is_node:     # another gateway of the cluster limited and meters it
            return await self._answer(request, endpoint, targets, body, None,
                                      Exchange(started), forwarded=True)
        ticket: Ticket | Refusal = self._limiter.admit(principal) if principal.limited else ()
        exchange = Exchange(started)
        response: web.StreamResponse | None = None
        try:
            if type(ticket) is Refusal:
                response = openai_error(429, ticket.message, code="rate_limit_exceeded",
                                        param=ticket.limit,
                                        headers={"Retry-After": str(ticket.retry_after_s)})
                return response
            if route.inlines_images and endpoint.upstream == CHAT and payload is not None:
                # Before forwarding: a peer's gateway checks the body it was signed for.
                try:
                    body = await self._images.inline(body, payload, self._max_body_bytes)
                except ImageRefused as refused:
                    response = refused.response()
                    return response
            response = await self._answer(request, endpoint, targets, body, payload, exchange)
            return response
        finally:
            self._settle(principal, ticket, route, endpoint, exchange, response)

    # --- routing and forwarding -------------------------------------------------------------

    def _targets(self, request: web.Request, principal: Principal,
                 route: ModelRoute) -> list[Target] | web.Response:
        """Running instances, least outstanding first (local ones win ties: one hop fewer);
        a pinned instance alone. Gateways and admins may pin (debugging one replica)."""
        pinned = request.headers.get(INSTANCE_HEADER)
        if pinned is not None:
            if not (principal.is_node or principal.is_admin):
                return openai_error(403, f"only admin keys may use {INSTANCE_HEADER}",
                                    type_="permission_error", code="forbidden")
            targets = [t for t in route.targets if t.instance_id == pinned and t.local]
        else:
            targets = route.targets
            if len(targets) > 1:
                outstanding = self._outstanding
                targets = sorted(targets, key=lambda t: (outstanding.get(t.instance_id, 0),
                                                         not t.local, t.instance_id))
        if not targets:
            return self._no_instance(route.name, pinned=pinned is not None)
        return targets

    async def _answer(self, request: web.Request, endpoint: Endpoint, targets: list[Target],
                      body: bytes, payload: dict[str, Any] | None, exchange: Exchange, *,
                      forwarded: bool = False) -> web.StreamResponse:
        streamed = payload is not None and endpoint.streams and payload.get("stream") is True
        if endpoint.upstream == RERANK and payload is not None and not forwarded:
            body = plain_documents(body, payload)
        if streamed:
            assert payload is not None
            exchange.streamed = True
            body, exchange.strip_usage = ask_for_usage(body, payload)
            if len(targets) > 1 and can_continue(endpoint, payload):
                exchange.sent = []
        content_type = request.headers.get("Content-Type", "application/json")
        last_error = ""
        for target in targets[:self._settings.max_attempts]:
            try:
                return await self._forward(request, endpoint, target, body, content_type,
                                           exchange)
            except StreamBroken as broken:
                if forwarded or payload is None:
                    return self._cut(request, broken, exchange)
                # The continuation re-encodes the request: from an exact parse of it.
                return await self._continue(request, endpoint, exact_payload(body), targets,
                                            target, broken, exchange)
            except EngineTimeout:
                # It has the request and may still be working on it: not sent elsewhere.
                return openai_error(504, f"instance {target.instance_id} did not answer within "
                                    f"{self._settings.response_timeout_s:g} s",
                                    type_="server_error", code="upstream_timeout")
            except (aiohttp.ClientConnectionError, TryAnotherInstance) as exc:
                # Nothing reached the client yet: another instance may answer.
                last_error = f"{target.instance_id}: {exc}"
                log.warning("instance %s unreachable, trying another: %s",
                            target.instance_id, exc)
        return openai_error(502, f"no instance of {targets[0].model} answered "
                            f"({last_error})", type_="server_error", code="upstream_unreachable",
                            headers={RETRY_HEADER: "another-instance"})

    async def _forward(self, request: web.Request, endpoint: Endpoint, target: Target,
                       body: bytes, content_type: str, exchange: Exchange,
                       response: web.StreamResponse | None = None) -> web.StreamResponse:
        if content_type == "application/json":
            headers = target.json_headers           # made once per target, never changed
        else:
            headers = {**target.json_headers, "Content-Type": content_type}
        if exchange.streamed and not target.keeps_stream_connections:
            # The engine answers `Connection: close`: this connection never enters the pool.
            headers = {**headers, "Connection": "close"}
        if not target.local:      # a peer's gateway: signed for this request alone
            headers = {**headers, FORWARD_HEADER: sign_forward(
                self._forward_key, endpoint.upstream, target.instance_id, body)}
        instance = target.instance_id
        exchange.instance, exchange.served_by = instance, target.node_id
        activation = self._activation or request.app[ACTIVATION]
        activation.started(target.model)        # an on-demand model is busy until it ends
        outstanding = self._outstanding
        outstanding[instance] = outstanding.get(instance, 0) + 1
        in_flight = self._metrics.in_flight
        if target.local:
            in_flight[target.series] += 1
        self._watchdog.watch(exchange, time.monotonic(), asyncio.current_task(self._loop))
        try:
            upstream = await self._send(target, endpoint.upstream, body, headers, exchange)
            try:
                if not target.local and RETRY_HEADER in upstream.headers:
                    # The peer says its instance is gone and nothing was sent.
                    raise TryAnotherInstance(f"node {target.node_id}: HTTP {upstream.status}, "
                                             "its instance is gone")
                exchange.upstream = upstream
                exchange.last_read_at = time.monotonic()
                return await relay_answer(request, upstream, exchange, response)
            finally:
                exchange.upstream = None
                upstream.release()      # back to the pool if read to the end, else closed
        finally:
            activation.finished(target.model)
            self._watchdog.forget(exchange)
            left = outstanding[instance] - 1
            if left > 0:
                outstanding[instance] = left
            else:
                del outstanding[instance]
            if target.local:
                in_flight[target.series] -= 1

    async def _send(self, target: Target, path: str, body: bytes, headers: dict[str, str],
                    exchange: Exchange) -> UpstreamAnswer:
        """Send the request and wait for the answer's headers.

        The watchdog cancels the wait after the response timeout (no timer per request: see
        StreamWatchdog). A pooled connection that turns out to be stale is replaced once:
        engines close idle keep-alive connections on their own schedule, and a request that
        took such a connection fails before its first byte. That says nothing about the
        engine, so it is sent again to the same instance on a fresh connection. Failing to
        connect at all (EngineUnreachable: refused, a connect timeout) does say the engine
        is not there: the caller tries another instance.
        """
        try:
            try:
                return await self._upstream.post(target.base_url, path, body, headers)
            except StaleConnection as exc:
                log.debug("instance %s: %s; retrying", target.instance_id, exc)
                exchange.last_read_at = time.monotonic()
                return await self._upstream.post(target.base_url, path, body, headers,
                                                 fresh=True)
        except asyncio.CancelledError:
            task = asyncio.current_task(self._loop)
            if not exchange.timed_out or task is None or task.uncancel() > 0:
                raise               # cancelled for another reason: let it through
            raise EngineTimeout(f"no answer within {self._settings.response_timeout_s:g} s") \
                from None

    async def _continue(self, request: web.Request, endpoint: Endpoint,
                        payload: dict[str, Any], targets: list[Target], failed: Target,
                        broken: StreamBroken, exchange: Exchange) -> web.StreamResponse:
        """Continue a broken stream on the other replicas, one after another."""
        tried = {failed.instance_id}
        while exchange.sent is not None:
            plan = continuation(endpoint, payload, exchange.sent)
            others = [t for t in targets if t.instance_id not in tried]
            if plan is None or (plan.body is not None and not others):
                break
            if not exchange.usage_seen:
                # The dead engine never reported its tokens: count what it sent.
                exchange.carried_tokens = plan.tokens_sent
            if plan.body is None:        # the answer was whole; only its end was lost
                await broken.response.write(b"data: [DONE]\n\n")
                await broken.response.write_eof()
                return broken.response
            target = others[0]
            tried.add(target.instance_id)
            log.warning("stream from instance %s broke after %d token(s) (%s); continuing it "
                        "on %s", failed.instance_id, plan.tokens_sent, broken, target.instance_id)
            exchange.rewrite = plan.rewrite
            try:
                return await self._forward(request, endpoint, target, plan.body,
                                           "application/json", exchange, broken.response)
            except StreamBroken as again:
                broken, failed = again, target
            except (aiohttp.ClientError, TryAnotherInstance) as exc:
                log.warning("instance %s could not continue the stream: %s",
                            target.instance_id, exc)
        return self._cut(request, broken, exchange)

    def _cut(self, request: web.Request, broken: StreamBroken,
             exchange: Exchange) -> web.StreamResponse:
        # Bytes reached the client and nothing can follow them: cut the connection so the
        # client sees a broken transfer, not a clean end of stream.
        log.warning("stream from instance %s broke after the first byte: %s",
                    exchange.instance, broken)
        exchange.status = 502
        if request.transport is not None:
            request.transport.close()
        return broken.response

    # --- settling ---------------------------------------------------------------------------

    def _settle(self, principal: Principal, ticket: Ticket | Refusal, route: ModelRoute,
                endpoint: Endpoint, exchange: Exchange,
                response: web.StreamResponse | None) -> None:
        status = exchange.status or (response.status if response is not None else 499)
        completion = exchange.completion_tokens + exchange.carried_tokens
        tokens = exchange.prompt_tokens + completion
        if not isinstance(ticket, Refusal):
            self._limiter.finish(ticket, tokens)
        served_by = exchange.served_by or self._node_id
        self._meter.record(principal, route.name, served_by, exchange.prompt_tokens,
                           completion, status >= 400)
        ttft = (exchange.first_chunk_at - exchange.started
                if exchange.streamed and exchange.first_chunk_at is not None else None)
        self._metrics.observe(route.name, endpoint.path, status,
                              time.monotonic() - exchange.started, ttft,
                              exchange.prompt_tokens, completion)

    # --- helpers ---------------------------------------------------------------------------

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
