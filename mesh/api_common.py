"""What the /api route modules share: a request body that must be a JSON object, and a
replicated write whose refusal is answered in OpenAI's shape."""

from __future__ import annotations

from typing import Any, Mapping

from aiohttp import web

from .errors import openai_error, write_unavailable
from .state import ClusterStore, CommandRejected, StateUnavailable

__all__ = ["json_object", "submit_or_error"]


async def json_object(request: web.Request) -> dict[str, Any] | web.Response:
    """The body as a JSON object, or a 400 (also for nesting too deep to parse)."""
    try:
        body = await request.json()
    except (ValueError, RecursionError):
        return openai_error(400, "the request body must be JSON")
    if not isinstance(body, dict):
        return openai_error(400, "the request body must be a JSON object")
    return body


async def submit_or_error(store: ClusterStore, command: dict[str, Any],
                          rejection_status: Mapping[str, int]) -> dict[str, Any] | web.Response:
    """The command's result once committed, or the answer to give instead: a refusal by
    `apply_command` with the status `rejection_status` names for its code (409 otherwise),
    a write the cluster could not take with `errors.write_unavailable`'s."""
    try:
        return await store.submit(command)
    except CommandRejected as exc:
        return openai_error(rejection_status.get(exc.code, 409), str(exc), code=exc.code)
    except StateUnavailable as exc:
        return write_unavailable(exc)
