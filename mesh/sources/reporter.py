"""Download progress in instance records, so every node (and `gpumesh instances`) sees it.

Every couple of seconds, for each of this node's instances in state `downloading`, the
progress of its repo's download (`progress.BOARD`) is written into the record's `download`
field — only when it moved, so an idle node writes nothing. One small write per
downloading instance per period: the API's `/api/downloads` has the live figures.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any, AsyncIterator, Callable

from aiohttp import web

from ..state import ClusterStore, CommandRejected, StateUnavailable
from .cache import ModelCache
from .progress import BOARD

__all__ = ["DownloadReporter", "reporter_part"]

log = logging.getLogger("gpumesh.sources")

REPORT_INTERVAL_S = 2.0
_FIELDS = ("state", "bytes_done", "bytes_total", "percent", "rate_bytes_per_s", "eta_s",
           "files_done", "files_total", "current_file", "error")


class DownloadReporter:
    def __init__(self, store: ClusterStore, node_id: str, cache_root: Path,
                 interval_s: float = REPORT_INTERVAL_S) -> None:
        self._store = store
        self._node_id = node_id
        self._cache = ModelCache(cache_root)
        self._interval_s = interval_s
        self._written: dict[str, dict[str, Any]] = {}

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            await self.report_once()

    async def report_once(self) -> None:
        view = self._store.view
        downloading = set()
        for instance in view.instances_on(self._node_id):
            model = view.models.get(instance["model"])
            if instance["state"] != "downloading" or not model or model["source"]["kind"] == "local":
                continue
            downloading.add(instance["id"])
            progress = BOARD.get(str(self._cache.folder(model["source"])))
            if progress is None:
                continue
            summary = {k: progress.get(k) for k in _FIELDS}
            if self._written.get(instance["id"]) == summary:
                continue
            try:
                await self._store.submit({"op": "update_instance", "id": instance["id"],
                                          "node_id": self._node_id,
                                          "changes": {"download": summary}})
                self._written[instance["id"]] = summary
            except (CommandRejected, StateUnavailable) as exc:
                log.debug("download progress of %s not recorded: %s", instance["id"], exc)
        for gone in set(self._written) - downloading:
            del self._written[gone]


def reporter_part(store: ClusterStore, node_id: str,
                  cache_root: Path) -> Callable[[web.Application], AsyncIterator[None]]:
    """An aiohttp cleanup_ctx part that runs the reporter for the app's lifetime."""
    async def part(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(DownloadReporter(store, node_id, cache_root).run(),
                                   name="download-reporter")
        try:
            yield
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    return part
