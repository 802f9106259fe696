"""What the /api route modules share: a request body that must be a JSON object, the model
record a deploy request makes, and a replicated write whose refusal is answered in
OpenAI's shape."""

from __future__ import annotations

import asyncio
from typing import Any, Mapping

from aiohttp import web

from .deployments import DeploymentError, build_model_record
from .errors import openai_error, write_unavailable
from .sources.routes import MODEL_CACHE
from .state import ClusterStore, CommandRejected, StateUnavailable

__all__ = ["json_object", "model_record", "submit_or_error"]


async def json_object(request: web.Request) -> dict[str, Any] | web.Response:
    """The body as a JSON object, or a 400 (also for nesting too deep to parse)."""
    try:
        body = await request.json()
    except (ValueError, RecursionError):
        return openai_error(400, "the request body must be JSON")
    if not isinstance(body, dict):
        return openai_error(400, "the request body must be a JSON object")
    return body


async def model_record(request: web.Request, store: ClusterStore) -> dict[str, Any] | web.Response:
    """The model record of a deploy request's body (`POST /api/models`, and the evaluation
    of one), or the 400 for a body that is not one. The default engine depends on the
    nodes, so both get the one a deploy would."""
    spec = await json_object(request)
    if isinstance(spec, web.Response):
        return spec
    try:
        nodes = [node.get("backends") or {} for node in store.view.nodes.values()]
        return await asyncio.to_thread(build_model_record, spec, nodes,
                                       request.app.get(MODEL_CACHE))
    except DeploymentError as exc:
        return openai_error(400, str(exc), param=exc.param, code="invalid_deployment")


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
