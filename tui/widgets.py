"""The console's own widgets: the view bar, fixed-scale braille charts, row tables and their
keyed sync."""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.widget import Widget
from textual.widgets import DataTable, Static
from textual.widgets.data_table import CellDoesNotExist

__all__ = ["BrailleChart", "NavBar", "VIEWS", "cursor_key", "row_table", "sync_rows"]

# (mode, digit, label): the views, in the order the digits switch between them.
VIEWS = (("cluster", "1", "Cluster"), ("gpus", "2", "GPUs"), ("models", "3", "Models"),
         ("instances", "4", "Instances"), ("keys", "5", "Keys"), ("usage", "6", "Usage"))


class NavBar(Horizontal):
    """One line: the views (clickable; the current one marked) and the connection."""

    DEFAULT_CSS = """
    NavBar { height: 1; dock: top; background: $panel; }
    NavBar > #views { width: 1fr; min-width: 52; text-wrap: nowrap;
                      link-style: none; link-color: $foreground; link-background: $panel;
                      link-style-hover: reverse; }
    NavBar > #link { width: auto; max-width: 50%; text-wrap: nowrap; text-overflow: ellipsis; }
    """

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode

    def compose(self) -> ComposeResult:
        yield Static(self._views(), id="views", markup=True)
        yield Static(id="link", markup=False)

    def _views(self) -> str:
        parts = []
        for mode, digit, label in VIEWS:
            text = f"{digit} {label}"
            if mode == self.mode:
                parts.append(f"[reverse b] {text} [/]")
            else:
                parts.append(f"[@click=app.switch_mode('{mode}')] {text} [/]")
        return "".join(parts)

    def show_link(self, text: str) -> None:
        self.query_one("#link", Static).update(text)


# Braille dots, bottom row first, for the left and the right column of a cell.
_LEFT = (0x40, 0x04, 0x02, 0x01)
_RIGHT = (0x80, 0x20, 0x10, 0x08)


class BrailleChart(Widget):
    """An area chart on a fixed scale (0–100 %, 0–TDP …), two samples per column.

    The scale never follows the data (a flat 95 % must look like 95 %, not like a full or an
    empty chart), and the first line says the value in words, so the chart reads without
    colour. Empty cells are spaces, not U+2800 (which some fonts draw as dots)."""

    DEFAULT_CSS = """
    BrailleChart { height: 1fr; min-height: 2; }
    BrailleChart > .chart--title { text-style: bold; }
    """
    COMPONENT_CLASSES = {"chart--title"}

    def __init__(self, title: str, unit: str, scale: float | None, *, id: str | None = None):
        super().__init__(id=id)
        self.title = title
        self.unit = unit
        self.scale = scale               # None: the larger of 1.25 × the peak and 1
        self._values: list[float | None] = []
        self._note = ""

    def show(self, values: Sequence[float | None], note: str = "") -> None:
        self._values = list(values)
        self._note = note
        self.refresh()

    def render(self) -> Text:
        width, height = self.size.width, max(1, self.size.height - 1)
        samples = self._values[-2 * width:] if width else []
        known = [v for v in samples if v is not None]
        scale = self.scale or max(1.0, 1.25 * max(known, default=0.0))
        last = next((v for v in reversed(self._values) if v is not None), None)
        title = f"{self.title} {'-' if last is None else f'{last:.0f}'}{self.unit}"
        title += f"  (0–{scale:.0f}{self.unit})" if not self.scale else ""
        if self._note:
            title += f"  {self._note}"
        text = Text(title[:width], style=self.get_component_rich_style("chart--title"))
        levels = [None if v is None else max(0, min(4 * height, round(v / scale * 4 * height)))
                  for v in samples]
        levels = [None] * (2 * width - len(levels)) + levels      # right-aligned: now is right
        for row in range(height):
            text.append("\n")
            text.append(_braille_row(levels, row, height))
        return text


def _braille_row(levels: list[int | None], row: int, height: int) -> str:
    floor = (height - 1 - row) * 4           # dots below this row
    cells = []
    for i in range(0, len(levels) - 1, 2):
        code = 0
        for column, bits in ((levels[i], _LEFT), (levels[i + 1], _RIGHT)):
            if column is None:
                continue
            for dot in range(max(0, min(4, column - floor))):
                code |= bits[dot]
        cells.append(chr(0x2800 + code) if code else " ")
    return "".join(cells)


def row_table(table_id: str, columns: Sequence[str],
              widths: Mapping[str, int] | None = None) -> DataTable:
    """A table the views fill with `sync_rows`: a row cursor, zebra stripes, one column per
    name (the name is its key; `widths` fixes some)."""
    table: DataTable = DataTable(id=table_id, cursor_type="row", zebra_stripes=True)
    for column in columns:
        table.add_column(column, key=column, width=(widths or {}).get(column))
    return table


def sync_rows(table: DataTable, rows: Iterable[tuple[str, Sequence[Any]]]) -> None:
    """Make `table` show `rows` (key, cells) in this order, touching only what changed.

    Same keys in the same order: `update_cell` where a value differs (the cursor and the
    scroll position stay). Anything else: rebuild, then put the cursor back on the row it
    was on (by key) and restore the scroll position (CONSOLE-NOTES §2)."""
    rows = list(rows)
    shown: dict[str, tuple] = getattr(table, "_shown_rows", {})
    keys = [key for key, _ in rows]
    if keys == list(shown):
        columns = [c.key for c in table.ordered_columns]
        for key, cells in rows:
            old = shown[key]
            for column, value, before in zip(columns, cells, old):
                if value != before:
                    table.update_cell(key, column, value)
            shown[key] = tuple(cells)
        return
    cursor_key = _cursor_key(table)
    scroll = table.scroll_y
    table.clear()
    for key, cells in rows:
        table.add_row(*cells, key=key)
    table._shown_rows = {key: tuple(cells) for key, cells in rows}   # type: ignore[attr-defined]
    if cursor_key in table._shown_rows:                               # type: ignore[attr-defined]
        table.move_cursor(row=keys.index(cursor_key), animate=False, scroll=False)
    table.scroll_to(y=scroll, animate=False, immediate=True)


def _cursor_key(table: DataTable) -> str | None:
    if not table.row_count:
        return None
    try:
        return table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value
    except CellDoesNotExist:         # a cursor past the last row after a shrink
        return None


def cursor_key(table: DataTable) -> str | None:
    """The key of the row under the cursor, or None for an empty table."""
    return _cursor_key(table)
