"""Errors in OpenAI's shape, for every route: `{"error": {message, type, param, code}}`.

Official OpenAI clients turn this body into their usual exceptions, so the gateway, the
management API and even aiohttp's own refusals (unknown route, wrong method, body too
large) all speak it. An unexpected exception is logged with its traceback and answered 500.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from aiohttp import web

__all__ = ["Admission", "openai_error", "error_middleware", "error_middleware_with",
           "write_unavailable"]

log = logging.getLogger("gpumesh.http")

_TYPES = {401: "invalid_request_error", 403: "permission_error", 404: "invalid_request_error",
          429: "rate_limit_error"}


def openai_error(status: int, message: str, *, type_: str | None = None,
                 code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None) -> web.Response:
    """An error body shaped as OpenAI's, so official clients raise their usual exceptions."""
    kind = type_ or _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return web.json_response(body, status=status, headers=headers)


def write_unavailable(exc: Exception) -> web.Response:
    """The answer to a write the cluster could not take (a `state.StateUnavailable`).

    504 `outcome_unknown` when the write may still apply (the client should re-read before
    retrying), 503 `storage_full` when this node's disk is full, else 503 `no_quorum`."""
    from .raft.errors import StorageFull, WriteOutcomeUnknown   # errors.py stays import-light
    if isinstance(exc, WriteOutcomeUnknown):
        return openai_error(504, f"the write's outcome is unknown: {exc}",
                            type_="server_error", code="outcome_unknown")
    if isinstance(exc, StorageFull):
        return openai_error(503, f"this node cannot accept writes: {exc}",
                            type_="server_error", code="storage_full",
                            headers={"Retry-After": "30"})
    return openai_error(503, f"the cluster cannot accept writes now: {exc}",
                        type_="server_error", code="no_quorum", headers={"Retry-After": "2"})


# A synchronous check run before the handler, inside the same middleware: the caller's
# refusal (an error response), or None to go on (it may annotate the request).
Admission = Callable[[web.Request], "web.StreamResponse | None"]


def error_middleware_with(admit: Admission | None = None) -> Callable[..., Any]:
    """The error middleware, running `admit` (the node's auth check) first, in one layer.

    One layer, not an auth middleware inside an error middleware: every coroutine frame
    between aiohttp and the handler is entered again each time a request resumes (when the
    engine's headers arrive, when its body does …), so a layer costs on every wake-up of
    every request, and the gateway's event loop is its bound under load."""
    @web.middleware
    async def middleware(request: web.Request, handler: Any) -> web.StreamResponse:
        try:
            if admit is not None:
                refusal = admit(request)
                if refusal is not None:
                    return refusal
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            message = {404: f"no route {request.method} {request.path}",
                       405: f"{request.method} is not allowed on {request.path}",
                       413: f"the request body is larger than "
                            f"{request.app._client_max_size} bytes",
                       }.get(exc.status, exc.text or exc.reason)
            return openai_error(exc.status, message, headers=_allow_header(exc))
        except Exception:
            log.exception("unhandled error on %s %s", request.method, request.path)
            return openai_error(500, "internal error in gpumesh; the node's log has the "
                                "details", code="internal_error")
    return middleware


# Errors only (no admission check): for apps without auth.
error_middleware = error_middleware_with()


def _allow_header(exc: web.HTTPException) -> dict[str, str] | None:
    allow = exc.headers.get("Allow")
    return {"Allow": allow} if allow else None
