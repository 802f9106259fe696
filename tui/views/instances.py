"""4 Instances: state, node, GPUs, port, uptime, restarts, download progress; the log of the
instance under the cursor, following live; restart."""

from __future__ import annotations

import asyncio
from typing import Any

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.widgets import DataTable, Input, Log

from ..client import ApiError
from ..format import span
from ..modals import ConfirmModal
from ..widgets import cursor_key, row_table, sync_rows
from .base import View

__all__ = ["InstancesView"]

COLUMNS = ("INSTANCE", "MODEL", "STATE", "NODE", "GPUS", "PORT", "UP", "RESTARTS", "REASON")
LOG_LINES = 2000
TAIL_LINES = 200
_FLUSH_S = 0.1          # log lines are written in batches (one write per line costs 20×)


class InstancesView(View):
    MODE = "instances"
    TOPICS = frozenset({"instances", "nodes", "clock"})
    HELP_TEXT = ("Every instance. The lower pane follows the log of the instance under the "
                 "cursor; f stops or resumes following, enter maximises it.")
    BINDINGS = [
        Binding("r", "restart", "Restart", id="instances.restart"),
        Binding("f", "follow", "Follow log", id="instances.follow"),
        Binding("enter", "maximize_log", "Log", id="instances.log"),
    ]

    def compose_body(self) -> ComposeResult:
        yield row_table("instances", COLUMNS)
        yield Log(id="log", max_lines=LOG_LINES)

    def on_mount(self) -> None:
        super().on_mount()
        self._following: str | None = None     # the instance whose log is shown
        self._pending: list[str] = []
        self._flush = self.set_interval(_FLUSH_S, self._flush_lines, pause=True)
        self.query_one("#log", Log).border_title = "log"

    def redraw(self, topics: set[str]) -> None:
        model = self.app.model
        rows = self.visible((instance["id"], self._row(instance)) for instance in
                            sorted(model.instances.values(), key=lambda i: (i["model"], i["id"])))
        sync_rows(self.query_one("#instances", DataTable), rows)
        self._follow_current()

    def _row(self, instance: dict[str, Any]) -> tuple:
        model = self.app.model
        node = model.nodes.get(instance.get("node_id", ""), {})
        allocation = instance.get("allocation") or {}
        gpus = ",".join(str(i) for i in allocation.get("gpu_indices") or []) or \
            allocation.get("device") or "-"
        state = instance.get("state", "-")
        if progress := _progress(instance):
            state = f"{state} {progress}"
        return (instance["id"], instance.get("model", "-"), state,
                node.get("name", instance.get("node_id", "-")), gpus,
                str(instance.get("port") or "-"), self._uptime(instance),
                str(instance.get("restarts", 0)),
                _one_line(instance.get("reason") or (instance.get("progress") or {}).get("step")))

    def _uptime(self, instance: dict[str, Any]) -> str:
        if instance.get("state") != "running":
            return "-"
        since = instance.get("started_at") or instance.get("updated")
        return span(self.app.model.clock() - since) if since else "-"

    def show_model(self, name: str) -> None:
        """Filter to one model's instances (from the Models view)."""
        box = self.query_one("#filter", Input)
        box.display = True
        box.value = name
        self.query_one("#instances", DataTable).focus()

    # --- the log ---------------------------------------------------------------------------

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        self._follow_current()

    def on_screen_suspend(self) -> None:
        # Mode screens stay mounted: stop the tail while hidden, start again on resume.
        self.workers.cancel_group(self, "logs")
        self._following = None
        self._flush.pause()

    def _follow_current(self) -> None:
        key = cursor_key(self.query_one("#instances", DataTable))
        if key == self._following or not self.is_current:
            return
        self._following = key
        log = self.query_one("#log", Log)
        log.clear()
        self._pending.clear()
        self.workers.cancel_group(self, "logs")
        if key is None:
            log.border_title = "log"
            return
        log.border_title = f"log of {key}" + ("" if log.auto_scroll else " (paused)")
        self._flush.resume()
        self._tail(key)

    @work(group="logs", exclusive=True, exit_on_error=False)
    async def _tail(self, instance_id: str) -> None:
        path = f"/api/instances/{instance_id}/logs"
        delay = 1.0
        while True:
            try:
                async for line in self.app.client.lines(
                        path, params={"follow": "1", "tail": str(TAIL_LINES)}):
                    self._pending.append(line)
                    delay = 1.0
            except ApiError as exc:
                if exc.missing_route:
                    self._pending.append("this node has no logs API yet "
                                         "(GET /api/instances/{id}/logs)")
                    return
                if exc.status == 404:
                    self._pending.append(f"{instance_id}: no log ({exc})")
                    return
                self._pending.append(f"-- log stream lost: {exc}; retrying --")
            await asyncio.sleep(delay)         # the engine restarted, or the node did
            delay = min(delay * 2, 15.0)

    def _flush_lines(self) -> None:
        if self._pending:
            lines, self._pending = self._pending, []
            self.query_one("#log", Log).write_lines(lines)

    def action_follow(self) -> None:
        log = self.query_one("#log", Log)
        log.auto_scroll = not log.auto_scroll
        if log.auto_scroll:
            log.scroll_end(animate=False)
        log.border_title = f"log of {self._following or '-'}" + (
            "" if log.auto_scroll else " (paused)")

    def action_maximize_log(self) -> None:
        if self.maximized is None:
            self.maximize(self.query_one("#log", Log), container=False)
        else:
            self.minimize()

    async def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        self.action_maximize_log()

    @work(group="instances-actions", exit_on_error=False)
    async def action_restart(self) -> None:
        key = cursor_key(self.query_one("#instances", DataTable))
        if key is None:
            return
        if not await self.app.push_screen_wait(ConfirmModal(
                f"Restart {key}? Requests it is serving now fail.", yes="Restart",
                destructive=True)):
            return
        await self.call_api(
            f"restart of {key}", "POST", f"/api/instances/{key}/restart", {},
            done=f"restarting {key}",
            missing="this node has no restart API yet (POST /api/instances/{id}/restart)")


def _progress(instance: dict[str, Any]) -> str:
    """Progress, where the agent reports it: bytes done of total (a download), or the time
    a step has taken so far (an engine being installed: `{step, elapsed_s}`)."""
    progress = instance.get("progress")
    if not isinstance(progress, dict):
        return ""
    done = progress.get("done_bytes", progress.get("downloaded_bytes"))
    total = progress.get("total_bytes")
    if done is not None and total:
        return f"{100 * done / total:.0f}%"
    if progress.get("elapsed_s") is not None:
        return span(progress["elapsed_s"])
    return ""


def _one_line(text: Any) -> str:
    if not text:
        return ""
    lines = [line for line in str(text).splitlines() if line.strip()]
    return lines[-1][:200] if lines else ""
