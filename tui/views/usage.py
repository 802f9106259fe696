"""6 Usage: requests and tokens per model and key (the last 24 hours), rates now, and the
cluster's request and token rates over the last minutes.

Rates come from the event stream (each node folds its metered usage into the replicated
state about once a second; the stream sends the changed hour), so they need no polling. The
24-hour totals come from `GET /api/usage?since=24h`, asked for on showing the view and every
30 s while it is shown.
"""

from __future__ import annotations

from typing import Any

from textual import work
from textual.app import ComposeResult
from textual.containers import Grid
from textual.widgets import DataTable, Static

from ..client import ApiError
from ..widgets import BrailleChart, row_table, sync_rows
from .base import View, matches

__all__ = ["UsageView"]

COLUMNS = ("MODEL", "KEY", "REQ 24H", "TOKENS 24H", "ERR 24H", "REQ/MIN", "TOK/S")
TOTALS_EVERY_S = 30.0


class UsageView(View):
    MODE = "usage"
    TOPICS = frozenset({"usage", "clock", "api_keys"})
    HELP_TEXT = ("Requests and tokens per model and key over the last 24 hours, the rate of "
                 "each over the last minute, and the cluster's rates over the last minutes.")

    def compose_body(self) -> ComposeResult:
        yield Static(id="usage-note")
        yield row_table("usage", COLUMNS)
        with Grid(id="usage-charts"):
            yield BrailleChart("requests/min", "", None, id="chart-rpm")
            yield BrailleChart("tokens/s", "", None, id="chart-tps")

    def on_mount(self) -> None:
        super().on_mount()
        self.totals: list[dict[str, Any]] | None = None    # None: not fetched, or no API
        self._poller = self.set_interval(TOTALS_EVERY_S, self._fetch_totals, pause=True)

    def on_screen_resume(self) -> None:
        super().on_screen_resume()
        self._fetch_totals()
        self._poller.resume()

    def on_screen_suspend(self) -> None:
        self._poller.pause()

    @work(group="usage", exclusive=True, exit_on_error=False)
    async def _fetch_totals(self) -> None:
        try:
            reply = await self.app.client.get("/api/usage", since="24h", by="model,key")
        except ApiError as exc:
            self.totals = None
            if not exc.missing_route:
                self.notify(f"usage: {exc}", severity="warning", timeout=5)
        else:
            self.totals = list(reply.get("data", [])) if isinstance(reply, dict) else []
        self.redraw({"usage"})

    def redraw(self, topics: set[str]) -> None:
        model = self.app.model
        metered = model.has_usage or self.totals is not None
        self.set_class(not metered, "-no-api")
        self.query_one("#usage-note", Static).update(
            "" if metered else "no usage metering on this node yet (GET /api/usage)")
        table = self.query_one("#usage", DataTable)
        table.display = metered
        names = {k["id"]: k.get("name", k["id"]) for k in model.api_keys.values()}
        rates = model.usage_rates()
        totals = {(str(r.get("model")), str(r.get("key"))): r for r in self.totals or []}
        rows = []
        for ident in sorted(totals.keys() | rates.keys(),
                            key=lambda i: -int(totals.get(i, {}).get("requests", 0))):
            total = totals.get(ident, {})
            rate = rates.get(ident)
            cells = (ident[0], names.get(ident[1]) or total.get("name") or ident[1],
                     str(total.get("requests", "-")), str(total.get("total_tokens", "-")),
                     str(total.get("errors", "-")),
                     f"{rate[0]:.1f}" if rate else "-", f"{rate[1]:.1f}" if rate else "-")
            if matches(self.filter_text, cells):
                rows.append(("|".join(ident), cells))
        sync_rows(table, rows)
        self.query_one("#chart-rpm", BrailleChart).show(list(model.usage_rpm))
        self.query_one("#chart-tps", BrailleChart).show(list(model.usage_tps))
