"""LiveTable: a read-only table for values that change every second (the GPUs view).

Why not DataTable: any `update_cell` bumps DataTable's update counter, which is in every
row's cache key, so every visible cell is re-rendered through Rich on every tick — 80 % of
the GPU view's CPU at 200×50 with 128 GPUs (profiled; CONSOLE-NOTES §2 saw the same). This
widget draws each visible line as one Strip of pre-padded cells with the line API, and keeps
each row's Strip until that row's cells, the cursor or the width change. It does what the
GPU view needs and no more: a fixed header (click to sort), a row cursor (keys and mouse),
bold group rows, and messages naming rows by key.
"""

from __future__ import annotations

from typing import Sequence

from rich.cells import cell_len, set_cell_size
from rich.segment import Segment
from rich.style import Style
from textual import events
from textual.binding import Binding
from textual.geometry import Size
from textual.message import Message
from textual.reactive import reactive
from textual.scroll_view import ScrollView
from textual.strip import Strip

__all__ = ["LiveTable"]

_GAP = 2                    # spaces between columns


class LiveTable(ScrollView, can_focus=True):
    DEFAULT_CSS = """
    LiveTable { height: 1fr; min-height: 4; }
    LiveTable > .live-table--header { text-style: bold; background: $panel; }
    LiveTable > .live-table--group { text-style: bold; }
    LiveTable > .live-table--cursor { background: $block-cursor-background;
                                      color: $block-cursor-foreground; text-style: bold; }
    LiveTable:blur > .live-table--cursor { background: $block-cursor-blurred-background;
                                           text-style: none; }
    """
    COMPONENT_CLASSES = {"live-table--header", "live-table--group", "live-table--cursor"}
    BINDINGS = [
        Binding("up", "move(-1)", "Up", show=False),
        Binding("down", "move(1)", "Down", show=False),
        Binding("pageup", "page(-1)", "Page up", show=False),
        Binding("pagedown", "page(1)", "Page down", show=False),
        Binding("home", "move(-1000000)", "First", show=False),
        Binding("end", "move(1000000)", "Last", show=False),
        Binding("enter", "select", "Select", show=False),
        Binding("left", "scroll_left", "Left", show=False),
        Binding("right", "scroll_right", "Right", show=False),
    ]

    cursor = reactive(0, always_update=True)

    class Highlighted(Message):
        def __init__(self, table: LiveTable, key: str | None) -> None:
            super().__init__()
            self.table = table
            self.key = key

    class Selected(Message):
        def __init__(self, table: LiveTable, key: str) -> None:
            super().__init__()
            self.table = table
            self.key = key

    class HeaderClicked(Message):
        def __init__(self, table: LiveTable, column: str) -> None:
            super().__init__()
            self.table = table
            self.column = column

    def __init__(self, columns: Sequence[str], *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.columns = tuple(columns)
        self.rows: dict[str, tuple[str, ...]] = {}
        self._keys: list[str] = []
        self._groups: set[str] = set()
        self._widths = [cell_len(c) for c in self.columns]
        self._strips: dict[tuple, Strip] = {}
        self._highlighted: str | None = None

    # --- data --------------------------------------------------------------------------------

    def set_rows(self, rows: Sequence[tuple[str, Sequence[str]]],
                 groups: set[str] | None = None) -> None:
        """Show `rows` (key, cells) in this order; `groups` are keys drawn bold. The cursor
        stays on its row (by key) when that row is still there."""
        current = self.cursor_key
        self.rows = {key: tuple(str(c) for c in cells) for key, cells in rows}
        self._keys = list(self.rows)
        self._groups = groups or set()
        widths = [cell_len(c) for c in self.columns]
        for cells in self.rows.values():
            widths = [max(w, cell_len(c)) for w, c in zip(widths, cells)]
        if widths != self._widths:
            self._widths = widths
            self._strips.clear()
        if len(self._strips) > 4 * len(self._keys) + 64:
            self._strips.clear()          # rows that changed leave stale Strips behind
        self.virtual_size = Size(sum(widths) + _GAP * len(widths), len(self._keys) + 1)
        if current in self.rows:
            self.cursor = self._keys.index(current)
        else:
            self.cursor = min(self.cursor, max(0, len(self._keys) - 1))
        self.refresh()

    @property
    def cursor_key(self) -> str | None:
        return self._keys[self.cursor] if 0 <= self.cursor < len(self._keys) else None

    @property
    def row_count(self) -> int:
        return len(self._keys)

    def move_to(self, key: str) -> None:
        if key in self.rows:
            self.cursor = self._keys.index(key)

    def watch_cursor(self, old: int, new: int) -> None:
        self._scroll_to_cursor()
        self.refresh()
        if (key := self.cursor_key) != self._highlighted:
            self._highlighted = key
            self.post_message(self.Highlighted(self, key))

    def _scroll_to_cursor(self) -> None:
        body = max(1, self.size.height - 1)
        top = round(self.scroll_y)
        if self.cursor < top:
            self.scroll_to(y=self.cursor, animate=False, immediate=True)
        elif self.cursor >= top + body:
            self.scroll_to(y=self.cursor - body + 1, animate=False, immediate=True)

    # --- keys and mouse ----------------------------------------------------------------------

    def action_move(self, delta: int) -> None:
        if self._keys:
            self.cursor = max(0, min(len(self._keys) - 1, self.cursor + delta))

    def action_page(self, direction: int) -> None:
        self.action_move(direction * max(1, self.size.height - 2))

    def action_select(self) -> None:
        if (key := self.cursor_key) is not None:
            self.post_message(self.Selected(self, key))

    def on_click(self, event: events.Click) -> None:
        if event.y == 0:
            x = event.x - 1 + round(self.scroll_x)           # lines start with one space
            for column, width in zip(self.columns, self._widths):
                if x < width + _GAP:
                    self.post_message(self.HeaderClicked(self, column))
                    return
                x -= width + _GAP
            return
        row = round(self.scroll_y) + event.y - 1
        if 0 <= row < len(self._keys):
            if row == self.cursor and event.chain > 1:
                self.action_select()
            self.cursor = row

    # --- drawing -----------------------------------------------------------------------------

    def render_line(self, y: int) -> Strip:
        width = self.size.width
        scroll_x = round(self.scroll_x)
        if y == 0:
            return self._line(self.columns, self.get_component_rich_style(
                "live-table--header"), scroll_x, width)
        row = round(self.scroll_y) + y - 1
        if row >= len(self._keys):
            return Strip.blank(width, self.rich_style)
        key = self._keys[row]
        style = self.rich_style
        if key in self._groups:
            style += self.get_component_rich_style("live-table--group")
        if row == self.cursor:
            style += self.get_component_rich_style("live-table--cursor")
        return self._line(self.rows[key], style, scroll_x, width)

    def _line(self, cells: Sequence[str], style: Style, scroll_x: int, width: int) -> Strip:
        cache_key = (tuple(cells), style, scroll_x, width)
        strip = self._strips.get(cache_key)
        if strip is None:
            text = "".join(set_cell_size(cell, w + _GAP) for cell, w in zip(cells, self._widths))
            strip = Strip([Segment(" " + text, style)]).crop_extend(scroll_x, scroll_x + width,
                                                                    style)
            self._strips[cache_key] = strip
        return strip
