"""2 GPUs: every GPU of every node, live; charts of the row under the cursor; nodes fold."""

from __future__ import annotations

from typing import Any

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Container, Grid
from textual.markup import escape
from ..format import bar, gib, num
from ..store import GpuRef
from ..table import LiveTable
from ..widgets import BrailleChart
from .base import View, matches

__all__ = ["GpusView"]

COLUMNS = ("GPU", "NAME", "UTIL", "MEMORY", "TEMP", "POWER", "INSTANCES")
# Sort orders: the key each row is ranked by (None: the node, then the GPU index).
SORTS = ("node", "util", "mem", "temp", "power")
_SORT_COLUMN = {"GPU": "node", "NAME": "node", "UTIL": "util", "MEMORY": "mem", "TEMP": "temp",
                "POWER": "power"}


class GpusView(View):
    MODE = "gpus"
    TOPICS = frozenset({"nodes", "instances", "telemetry"})
    HELP_TEXT = ("Every GPU of every node, once a second. The charts show the row under the "
                 "cursor over the last minutes (a node row: its GPUs together, or its CPU "
                 "and RAM when it has none). Charts use fixed scales: 0–100 %, 0–100 °C.")
    AUTO_FOCUS = "#gpus"
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (150, "-wide")]
    VERTICAL_BREAKPOINTS = [(0, "-short"), (40, "-tall")]
    BINDINGS = [
        Binding("space", "fold", "Fold node", id="gpus.fold"),
        Binding("z", "fold_all", "Fold all", id="gpus.fold_all"),
        Binding("s", "sort", "Sort", id="gpus.sort"),
        Binding("S", "reverse", "Reverse", show=False, id="gpus.reverse"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.folded: set[str] = set()
        self.sort_by = "node"
        self.descending = True

    def compose_body(self) -> ComposeResult:
        with Container(id="body"):
            yield LiveTable(COLUMNS, id="gpus")
            with Grid(id="charts"):
                yield BrailleChart("util", "%", 100.0, id="chart-util")
                yield BrailleChart("mem", "%", 100.0, id="chart-mem")
                yield BrailleChart("temp", "°C", 100.0, id="chart-temp")
                yield BrailleChart("power", "W", None, id="chart-power")

    # --- drawing ---------------------------------------------------------------------------

    def redraw(self, topics: set[str]) -> None:
        rows = self._rows()
        self.query_one("#gpus", LiveTable).set_rows(
            rows, groups={key for key, _ in rows if key.startswith("node:")})
        self._draw_charts()

    def _rows(self) -> list[tuple[str, tuple]]:
        model = self.app.model
        groups = []
        for node in model.nodes.values():
            node_id = node["id"]
            gpus = [g for g in model.gpus_of(node_id)
                    if matches(self.filter_text, self._gpu_cells(node_id, g) + (node.get("name", ""),))]
            header = self._node_cells(node, folded=node_id in self.folded)
            if not gpus and not matches(self.filter_text, header):
                continue
            gpus.sort(key=lambda g: self._rank(GpuRef(node_id, g.get("index")), g),
                      reverse=self._reverse)
            groups.append((self._rank(GpuRef(node_id, None), node), node_id, header, gpus))
        groups.sort(key=lambda g: g[0], reverse=self._reverse)
        rows = []
        for _, node_id, header, gpus in groups:
            rows.append((f"node:{node_id}", header))
            if node_id not in self.folded:
                rows += [(f"gpu:{node_id}:{g.get('index')}", self._gpu_cells(node_id, g))
                         for g in gpus]
        return rows

    @property
    def _reverse(self) -> bool:
        return self.sort_by != "node" and self.descending

    def _rank(self, ref: GpuRef, record: dict[str, Any]) -> tuple:
        if self.sort_by == "node":
            return (0, record.get("name") or "", ref.index if ref.index is not None else -1)
        series = self.app.model.series.get(ref)
        values = getattr(series, self.sort_by) if series else None
        value = values[-1] if values else None
        # Rows without a reading sort last whichever way.
        return (value is not None, value if value is not None else 0.0,
                -(ref.index if ref.index is not None else -1))

    def _node_cells(self, node: dict[str, Any], folded: bool) -> tuple:
        model = self.app.model
        node_id = node["id"]
        gpus = model.gpus_of(node_id)
        series = model.series.get(GpuRef(node_id, None))
        last = {m: (getattr(series, m)[-1] if series and getattr(series, m) else None)
                for m in ("util", "mem", "temp", "power")}
        state = model.node_state(node_id)
        if gpus:
            used = sum(g.get("memory_used_bytes") or 0 for g in gpus)
            total = sum(g.get("memory_total_bytes") or 0 for g in gpus)
            what = f"{len(gpus)} GPU(s)"
        else:
            used, total = model.node_memory(node_id)
            what = "CPU only"
        if state != "ready":
            what = f"{what}, {state}"
        return (f"{'▸' if folded else '▾'} {node.get('name', node_id)}", what, bar(last["util"]),
                f"{gib(used)}/{gib(total)}", num(last["temp"], "°C"), num(last["power"], "W"),
                str(len(model.instances_on(node_id))))

    def _gpu_cells(self, node_id: str, gpu: dict[str, Any]) -> tuple:
        instances = self.app.model.instances_on(node_id, gpu.get("index"))
        name = str(gpu.get("name", "?")).removeprefix("NVIDIA ").removeprefix("AMD ")
        return (f"   {gpu.get('index')}", name, bar(gpu.get("utilization_percent")),
                f"{gib(gpu.get('memory_used_bytes'))}/{gib(gpu.get('memory_total_bytes'))}",
                num(gpu.get("temperature_c"), "°C"), num(gpu.get("power_w"), "W"),
                ", ".join(i["model"] for i in instances) or "-")

    def _selected(self) -> GpuRef | None:
        key = self.query_one("#gpus", LiveTable).cursor_key
        if key is None:
            return None
        kind, _, rest = key.partition(":")
        if kind == "node":
            return GpuRef(rest, None)
        node_id, _, index = rest.rpartition(":")
        return GpuRef(node_id, int(index) if index.lstrip("-").isdigit() else None)

    def _draw_charts(self) -> None:
        ref = self._selected()
        model = self.app.model
        series = model.series.get(ref) if ref else None
        charts = self.query_one("#charts", Grid)
        if ref is None:
            charts.border_title = "no GPU selected"
        else:
            node = model.nodes.get(ref.node_id, {})
            label = node.get("name", ref.node_id)
            if ref.index is not None:
                label += f" · GPU {ref.index}"
            elif not model.gpus_of(ref.node_id):
                label += " · CPU and RAM"
            else:
                label += " · all GPUs"
            charts.border_title = escape(label)
        whole_cpu = ref is not None and ref.index is None and not model.gpus_of(ref.node_id)
        for metric in ("util", "mem", "temp", "power"):
            chart = self.query_one(f"#chart-{metric}", BrailleChart)
            chart.title = {"util": "cpu" if whole_cpu else "util",
                           "mem": "ram" if whole_cpu else "mem"}.get(metric, metric)
            chart.show(list(getattr(series, metric)) if series else [])

    # --- actions ---------------------------------------------------------------------------

    def on_live_table_highlighted(self, event: LiveTable.Highlighted) -> None:
        self._draw_charts()

    def on_live_table_selected(self, event: LiveTable.Selected) -> None:
        self.action_fold()

    def on_live_table_header_clicked(self, event: LiveTable.HeaderClicked) -> None:
        sort = _SORT_COLUMN.get(event.column)
        if sort is None:
            return
        if sort == self.sort_by:
            self.descending = not self.descending
        self.sort_by = sort
        self._resort()

    def action_fold(self) -> None:
        ref = self._selected()
        if ref is None:
            return
        self.folded ^= {ref.node_id}
        self.redraw(set(self.TOPICS))
        self.query_one("#gpus", LiveTable).move_to(f"node:{ref.node_id}")

    def action_fold_all(self) -> None:
        everything = set(self.app.model.nodes)
        self.folded = set() if self.folded >= everything else everything
        self.redraw(set(self.TOPICS))

    def action_sort(self) -> None:
        self.sort_by = SORTS[(SORTS.index(self.sort_by) + 1) % len(SORTS)]
        self._resort()

    def action_reverse(self) -> None:
        self.descending = not self.descending
        self._resort()

    def _resort(self) -> None:
        order = "" if self.sort_by == "node" else (" ↓" if self.descending else " ↑")
        self.notify(f"sorted by {self.sort_by}{order}", timeout=2)
        self.redraw(set(self.TOPICS))

    def focus_node(self, node_id: str) -> None:
        """Show `node_id`'s GPUs with the cursor on its row (from the Cluster view)."""
        self.folded.discard(node_id)
        self.redraw(set(self.TOPICS))
        self.query_one("#gpus", LiveTable).move_to(f"node:{node_id}")
