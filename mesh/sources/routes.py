"""This node's downloads and model cache over the management API.

    GET    /api/downloads            active and recent downloads: bytes, rate, ETA (this node)
    GET    /api/cache                the node's cache: one entry per repo and revision
    DELETE /api/cache/{key}          remove one entry (`?force=true` even while in use)

The cache is per node, so these answer for the node asked (`gpumesh --url`); a download's
progress also rides in its instance's record (`reporter.py`), visible from every node.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from aiohttp import web

from ..errors import openai_error
from ..state import ClusterStore
from .cache import ModelCache
from .progress import BOARD
from .spec import SourceError, source_key

__all__ = ["MODEL_CACHE", "SourcesApi"]

# The node's cache folder; the daemon sets it (an app without one answers 503 here).
MODEL_CACHE = web.AppKey("model_cache", Path)


class SourcesApi:
    def __init__(self, store: ClusterStore, node_id: str) -> None:
        self._store = store
        self._node_id = node_id

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/api/downloads", self.downloads)
        app.router.add_get("/api/cache", self.list_cache)
        app.router.add_delete("/api/cache/{key:.+}", self.remove)

    async def downloads(self, request: web.Request) -> web.Response:
        cache = _cache(request)
        if isinstance(cache, web.Response):
            return cache
        return web.json_response({"node_id": self._node_id,
                                  "data": BOARD.snapshot(under=str(cache.root))})

    async def list_cache(self, request: web.Request) -> web.Response:
        cache = _cache(request)
        if isinstance(cache, web.Response):
            return cache
        entries = await asyncio.to_thread(cache.entries)
        users = self._users()
        for entry in entries:
            entry["in_use_by"] = users.get(entry["key"], [])
        return web.json_response({"node_id": self._node_id, "root": str(cache.root),
                                  "data": entries})

    async def remove(self, request: web.Request) -> web.Response:
        cache = _cache(request)
        if isinstance(cache, web.Response):
            return cache
        key = request.match_info["key"]
        if not any(e["key"] == key for e in await asyncio.to_thread(cache.entries)):
            return openai_error(404, f"no cache entry {key!r} on this node (`gpumesh models "
                                "cache ls` lists them)", code="cache_entry_not_found",
                                param="key")
        users = self._users().get(key, [])
        if users and request.query.get("force") != "true":
            return openai_error(409, f"{key} is in use by {', '.join(users)} on this node: "
                                "remove (or scale to 0) those models first, or force it",
                                code="cache_in_use", param="key")
        try:
            result = await asyncio.to_thread(cache.remove, key)
        except SourceError as exc:
            return openai_error(404, str(exc), code="cache_entry_not_found", param="key")
        return web.json_response({"node_id": self._node_id, **result})

    def _users(self) -> dict[str, list[str]]:
        """cache key -> instances on this node whose model comes from it."""
        view = self._store.view
        users: dict[str, list[str]] = {}
        for instance in view.instances_on(self._node_id):
            model = view.models.get(instance["model"])
            if model and model["source"]["kind"] != "local":
                users.setdefault(source_key(model["source"]), []).append(
                    f"{instance['id']} ({instance['model']})")
        return users


def _cache(request: web.Request) -> ModelCache | web.Response:
    root = request.app.get(MODEL_CACHE)
    if root is None:
        return openai_error(503, "this node has no model cache", type_="server_error",
                            code="no_model_cache")
    return ModelCache(root)
