"""Errors in OpenAI's shape, for every route: `{"error": {message, type, param, code}}`.

Official OpenAI clients turn this body into their usual exceptions, so the gateway, the
management API and even aiohttp's own refusals (unknown route, wrong method, body too
large) all speak it. An unexpected exception is logged with its traceback and answered 500.
"""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web

__all__ = ["openai_error", "error_middleware", "write_unavailable"]

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


@web.middleware
async def error_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        message = {404: f"no route {request.method} {request.path}",
                   405: f"{request.method} is not allowed on {request.path}",
                   413: f"the request body is larger than {request.app._client_max_size} bytes",
                   }.get(exc.status, exc.text or exc.reason)
        return openai_error(exc.status, message, headers=_allow_header(exc))
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return openai_error(500, "internal error in gpumesh; the node's log has the details",
                            code="internal_error")


def _allow_header(exc: web.HTTPException) -> dict[str, str] | None:
    allow = exc.headers.get("Allow")
    return {"Allow": allow} if allow else None
