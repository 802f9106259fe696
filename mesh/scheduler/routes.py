"""`POST /api/models/evaluate`: a deploy request checked and planned, nothing stored.

The body is the deploy request (`POST /api/models`'s). The answer: the model's estimate,
compatibility checks, one plan per replica (or why it does not fit) and a summary in words.
Bad input gets the same 400 a deploy would.
"""

from __future__ import annotations

import asyncio
import time

from aiohttp import web

from ..api_common import model_record
from ..state import ClusterStore
from .evaluate import evaluate
from .placement import Scheduler

__all__ = ["EvaluateApi", "SCHEDULER"]

# The scheduler's settings (reserves) for this node; the daemon sets its configured one.
SCHEDULER = web.AppKey("scheduler", Scheduler)


class EvaluateApi:
    def __init__(self, store: ClusterStore) -> None:
        self._store = store

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/api/models/evaluate", self.evaluate)

    async def evaluate(self, request: web.Request) -> web.Response:
        record = await model_record(request, self._store)   # as a deploy would make it
        if isinstance(record, web.Response):
            return record
        view = self._store.view
        scheduler = request.app.get(SCHEDULER) or Scheduler()
        # Building an index walks every node: off the loop (the view never changes).
        answer = await asyncio.to_thread(evaluate, record, view.nodes, view.instances,
                                         scheduler, view.models, time.time(),
                                         view.engine_architectures)
        return web.json_response(answer)
