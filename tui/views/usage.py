"""6 Usage: requests and tokens per model and per key, over time, and the rates now."""

from __future__ import annotations

from collections import deque
from typing import Any

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Grid
from textual.widgets import DataTable, Static

from ..client import ApiError
from ..widgets import BrailleChart, sync_rows
from .base import View, matches

__all__ = ["UsageView"]

COLUMNS = ("MODEL", "KEY", "REQUESTS", "PROMPT TOK", "COMPL TOK", "ERRORS", "REQ/MIN", "TOK/S")
POLL_S = 5.0
_RATE_SAMPLES = 120      # ten minutes of polls


class UsageView(View):
    """Usage is not pushed on the event stream (it changes with every request); the view asks
    for it every few seconds, and only while it is on screen."""

    MODE = "usage"
    TOPICS = frozenset({"usage"})
    HELP_TEXT = "Requests and tokens per model and key since metering began; rates over the " \
                "last poll interval."
    BINDINGS = [Binding("g", "group", "Group by", id="usage.group")]

    def compose_body(self) -> ComposeResult:
        yield Static(id="usage-note")
        table: DataTable = DataTable(id="usage", cursor_type="row", zebra_stripes=True)
        for column in COLUMNS:
            table.add_column(column, key=column)
        yield table
        with Grid(id="usage-charts"):
            yield BrailleChart("requests/min", "", None, id="chart-rpm")
            yield BrailleChart("tokens/s", "", None, id="chart-tps")

    def on_mount(self) -> None:
        super().on_mount()
        self.group_by = "model+key"
        self.rows: list[dict[str, Any]] | None = None
        self._previous: dict[str, tuple[float, float, float]] = {}   # row -> (t, req, tok)
        self._rates: dict[str, tuple[float, float]] = {}
        self._rpm: deque[float | None] = deque(maxlen=_RATE_SAMPLES)
        self._tps: deque[float | None] = deque(maxlen=_RATE_SAMPLES)
        self._poller = self.set_interval(POLL_S, self._poll, pause=True)

    def on_screen_resume(self) -> None:
        super().on_screen_resume()
        self._poll()
        self._poller.resume()

    def on_screen_suspend(self) -> None:
        self._poller.pause()

    @work(group="usage", exclusive=True, exit_on_error=False)
    async def _poll(self) -> None:
        try:
            reply = await self.app.client.get("/api/usage")
        except ApiError as exc:
            self.rows = None
            self.query_one("#usage-note", Static).update(
                "no usage API on this node yet (GET /api/usage)" if exc.missing_route
                else f"usage: {exc}")
            self.redraw({"usage"})
            return
        self.rows = _usage_rows(reply)
        self._rate(self.app.model.clock())
        self.query_one("#usage-note", Static).update("")
        self.redraw({"usage"})

    def _rate(self, now: float) -> None:
        total_req = total_tok = 0.0
        seen = False
        for row in self.rows or []:
            key = _row_key(row)
            requests = float(row.get("requests", 0))
            tokens = float(row.get("prompt_tokens", 0)) + float(row.get("completion_tokens", 0))
            before = self._previous.get(key)
            self._previous[key] = (now, requests, tokens)
            if before is not None and now > before[0]:
                seconds = now - before[0]
                rate = (60 * (requests - before[1]) / seconds, (tokens - before[2]) / seconds)
                self._rates[key] = rate
                total_req += rate[0]
                total_tok += rate[1]
                seen = True
        self._rpm.append(total_req if seen else None)
        self._tps.append(total_tok if seen else None)

    def redraw(self, topics: set[str]) -> None:
        table = self.query_one("#usage", DataTable)
        self.set_class(self.rows is None, "-no-api")
        table.display = self.rows is not None
        rows = []
        for row in _group(self.rows or [], self.group_by):
            rate = self._rates.get(_row_key(row)) if self.group_by == "model+key" else None
            cells = (row.get("model", "-"), row.get("key", "-") or "-",
                     str(row.get("requests", 0)), str(row.get("prompt_tokens", 0)),
                     str(row.get("completion_tokens", 0)), str(row.get("errors", 0)),
                     f"{rate[0]:.1f}" if rate else "-", f"{rate[1]:.1f}" if rate else "-")
            if matches(self.filter_text, cells):
                rows.append((_row_key(row), cells))
        sync_rows(table, rows)
        self.query_one("#chart-rpm", BrailleChart).show(list(self._rpm))
        self.query_one("#chart-tps", BrailleChart).show(list(self._tps))

    def action_group(self) -> None:
        order = ("model+key", "model", "key")
        self.group_by = order[(order.index(self.group_by) + 1) % len(order)]
        self.notify(f"grouped by {self.group_by}", timeout=2)
        self.redraw({"usage"})


def _usage_rows(reply: Any) -> list[dict[str, Any]]:
    """Rows of totals per model and key, whatever the node groups them by (hours, nodes)."""
    rows = reply.get("data", []) if isinstance(reply, dict) else list(reply or [])
    return _group(rows, "model+key")


def _group(rows: list[dict[str, Any]], by: str) -> list[dict[str, Any]]:
    fields = {"model+key": ("model", "key"), "model": ("model",), "key": ("key",)}[by]
    merged: dict[tuple, dict[str, Any]] = {}
    for row in rows:
        ident = tuple(row.get(f) for f in fields)
        into = merged.setdefault(ident, {f: row.get(f) for f in fields})
        for count in ("requests", "prompt_tokens", "completion_tokens", "errors"):
            into[count] = into.get(count, 0) + int(row.get(count) or 0)
    return sorted(merged.values(), key=lambda r: -r.get("requests", 0))


def _row_key(row: dict[str, Any]) -> str:
    return f"{row.get('model')}|{row.get('key')}"
