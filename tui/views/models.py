"""3 Models: deployments (replicas wanted and ready, kind, backend, source, status and why);
deploy from a form that shows the resource evaluation first; scale, stop, delete."""

from __future__ import annotations

import urllib.parse
from typing import Any

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.widgets import DataTable, Static

from ..format import needs, source_label
from ..modals import ConfirmModal, DeployModal, NumberModal
from ..widgets import cursor_key, row_table, sync_rows
from .base import View

__all__ = ["ModelsView", "model_path"]

COLUMNS = ("MODEL", "STATUS", "READY", "KIND", "BACKEND", "SOURCE", "REASON")
MAX_REPLICAS = 64


def model_path(name: str) -> str:
    return "/api/models/" + urllib.parse.quote(name, safe="/:")


class ModelsView(View):
    MODE = "models"
    TOPICS = frozenset({"models", "instances", "nodes"})
    HELP_TEXT = "Every deployment. enter shows its instances."
    BINDINGS = [
        Binding("d", "deploy", "Deploy", id="models.deploy"),
        Binding("s", "scale", "Scale", id="models.scale"),
        Binding("x", "stop", "Stop", id="models.stop"),
        Binding("ctrl+d", "delete", "Delete", id="models.delete"),
        Binding("enter", "instances", "Instances", id="models.instances"),
    ]

    def compose_body(self) -> ComposeResult:
        # Sources and reasons can be long: the detail line below has them in full.
        yield row_table("models", COLUMNS, {"SOURCE": 26, "REASON": 40})
        yield Static(id="detail")

    def redraw(self, topics: set[str]) -> None:
        rows = self.visible((name, self._row(self.app.model.models[name]))
                            for name in sorted(self.app.model.models))
        table = self.query_one("#models", DataTable)
        sync_rows(table, rows)
        self._show_detail()
        if not rows:
            self.query_one("#detail", Static).update(
                "no models yet: press d to deploy one" if not self.app.model.models
                else "no model matches the filter")

    def _row(self, model: dict[str, Any]) -> tuple:
        return (model["name"], model.get("status", "-"),
                f"{model.get('ready_replicas', 0)}/{model.get('replicas', 0)}",
                model.get("kind") or "-", self._backend(model),
                source_label(model.get("source")), self._reason(model))

    def _backend(self, model: dict[str, Any]) -> str:
        name = model.get("backend") or "-"
        version = model.get("backend_version") or next(
            (i["engine"]["version"] for i in self.app.model.instances.values()
             if i.get("model") == model["name"] and (i.get("engine") or {}).get("version")),
            None)                         # the version its instances run
        if not version:                   # else the version the nodes offer
            for node in self.app.model.nodes.values():
                if found := (node.get("backends") or {}).get(name, {}).get("version"):
                    version = found
                    break
        return f"{name} {version}" if version else name

    def _reason(self, model: dict[str, Any]) -> str:
        if model.get("schedule_error"):
            return str(model["schedule_error"])
        for instance in self.app.model.instances.values():
            if instance.get("model") == model["name"] and instance.get("reason") and \
                    instance.get("state") == "error":
                return str(instance["reason"]).splitlines()[-1] if instance["reason"] else ""
        return ""

    def _show_detail(self) -> None:
        name = self._current()
        model = self.app.model.models.get(name or "")
        detail = self.query_one("#detail", Static)
        if model is None:
            detail.update("")
            return
        parts = [f"{model['name']}: {model.get('status', '-')}",
                 f"{model.get('ready_replicas', 0)} of {model.get('replicas', 0)} ready",
                 f"format {model.get('format', '-')}"]
        if wanted := needs(model.get("estimate")):
            parts.append(f"{wanted} per replica")
        if model.get("context_length"):
            parts.append(f"context {model['context_length']}")
        reason = self._reason(model)
        detail.update(" · ".join(parts) + (f"\n{reason}" if reason else ""), layout=True)

    def _current(self) -> str | None:
        return cursor_key(self.query_one("#models", DataTable))

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        self._show_detail()

    async def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        await self.action_instances()

    async def action_instances(self) -> None:
        name = self._current()
        if name is None:
            return
        await self.app.switch_mode("instances")
        self.app.screen.show_model(name)     # type: ignore[attr-defined]

    # --- changes (dialogs first, then the request in a worker) -----------------------------

    @work(group="models-actions", exit_on_error=False)
    async def action_deploy(self) -> None:
        backends = sorted({name for node in self.app.model.nodes.values()
                           for name in (node.get("backends") or {})})
        spec = await self.app.push_screen_wait(DeployModal(backends))
        if spec is None:
            return
        await self.call_api(f"deploying {spec['name']}", "POST", "/api/models", spec)

    @work(group="models-actions", exit_on_error=False)
    async def action_scale(self) -> None:
        model = self.app.model.models.get(self._current() or "")
        if model is None:
            return
        replicas = await self.app.push_screen_wait(NumberModal(
            f"Replicas of {model['name']} (now {model.get('replicas', 0)})",
            int(model.get("replicas", 0)), 0, MAX_REPLICAS))
        if replicas is not None:
            await self.call_api(f"scaling {model['name']} to {replicas}", "PATCH",
                             model_path(model["name"]), {"replicas": replicas})

    @work(group="models-actions", exit_on_error=False)
    async def action_stop(self) -> None:
        name = self._current()
        if name is None:
            return
        if await self.app.push_screen_wait(ConfirmModal(
                f"Stop {name}? Its instances end; the deployment stays (scale it up again).",
                yes="Stop", destructive=True)):
            await self.call_api(f"stopping {name}", "PATCH", model_path(name), {"replicas": 0})

    @work(group="models-actions", exit_on_error=False)
    async def action_delete(self) -> None:
        name = self._current()
        if name is None:
            return
        if await self.app.push_screen_wait(ConfirmModal(
                f"Delete {name}? Its instances end and the deployment is removed.",
                yes="Delete", destructive=True)):
            await self.call_api(f"deleting {name}", "DELETE", model_path(name))

