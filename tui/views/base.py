"""What every view shares: the view bar, a filter line, the footer, and redraws that follow
the store (only while the view is on screen: mode screens stay mounted when hidden)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Iterable, Sequence

from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import Footer, Input

from ..client import ApiError
from ..widgets import NavBar

if TYPE_CHECKING:
    from ..app import GpumeshConsole

__all__ = ["View", "matches"]


class View(Screen):
    """One of the six views (a mode). Subclasses compose their body and implement `redraw`."""

    AUTO_FOCUS = "DataTable"          # never the filter Input: it would swallow the digits
    MODE: ClassVar[str] = ""
    TOPICS: ClassVar[frozenset[str]] = frozenset()
    HELP_TEXT: ClassVar[str] = ""
    BINDINGS = [
        Binding("slash", "filter", "Filter", id="view.filter"),
        Binding("escape", "back", "Back", show=False, id="view.back"),
    ]

    app: GpumeshConsole

    def compose(self) -> ComposeResult:
        yield NavBar(self.MODE)
        yield from self.compose_body()
        yield Input(placeholder="filter (esc clears)", id="filter", compact=True)
        yield Footer(compact=True)

    def compose_body(self) -> ComposeResult:
        raise NotImplementedError

    @property
    def filter_text(self) -> str:
        return self.query_one("#filter", Input).value.strip().lower()

    def visible(self, rows: Iterable[tuple[str, Sequence[Any]]]) -> list[tuple[str, Sequence[Any]]]:
        """The rows (key, cells) whose cells match the filter line, in their order."""
        text = self.filter_text
        return [(key, cells) for key, cells in rows if matches(text, cells)]

    async def call_api(self, what: str, method: str, path: str, body: Any = None, *,
                       done: str | None = None, missing: str | None = None) -> None:
        """One write to the attached node, and how it went in a notification: `done` (else
        "WHAT: done") for 3 s, or "WHAT failed: ERROR" for 8 s (`missing` instead, when
        given, for a node too old to have the route)."""
        try:
            await self.app.client.request(method, path, json_body=body)
        except ApiError as exc:
            message = missing if missing and exc.missing_route else f"{what} failed: {exc}"
            self.notify(message, severity="error", timeout=8)
        else:
            self.notify(done or f"{what}: done", timeout=3)

    # --- following the store ---------------------------------------------------------------

    def on_mount(self) -> None:
        self._seen: dict[str, int] = {}
        self.query_one("#filter", Input).display = False
        self.watch(self.app, "state_seq", self._store_changed, init=False)
        self.watch(self.app, "link_text", self._link_changed)

    def on_screen_resume(self) -> None:
        self._seen = {}
        self._store_changed()

    def _store_changed(self, _: int | None = None) -> None:
        if not self.is_current:
            return                     # hidden views catch up when they are shown again
        changed = {t for t in self.TOPICS if self.app.topic_seq.get(t, 0) != self._seen.get(t)}
        if not changed:
            return
        self._seen.update({t: self.app.topic_seq.get(t, 0) for t in changed})
        with self.app.batch_update():
            self.redraw(changed)

    def _link_changed(self, text: str) -> None:
        self.query_one(NavBar).show_link(text)

    def redraw(self, topics: set[str]) -> None:
        """Show the store's current state; `topics` says what changed since the last time."""
        raise NotImplementedError

    # --- filter and back -------------------------------------------------------------------

    def action_filter(self) -> None:
        box = self.query_one("#filter", Input)
        box.display = True
        box.focus()

    def on_input_changed(self, event: Input.Changed) -> None:
        if event.input.id == "filter":
            event.stop()
            self.redraw(set(self.TOPICS))

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if event.input.id == "filter":
            event.stop()
            if not event.value:
                event.input.display = False
            self._focus_main()

    def action_back(self) -> None:
        """esc: clear and close the filter first; then leave a pushed screen."""
        box = self.query_one("#filter", Input)
        if box.display or box.value:
            box.value = ""
            box.display = False
            self._focus_main()
        elif len(self.app.screen_stack) > 1:
            self.app.pop_screen()

    def _focus_main(self) -> None:
        if self.AUTO_FOCUS and (found := self.query(self.AUTO_FOCUS)):
            found.first().focus()


def matches(filter_text: str, cells: Iterable[object]) -> bool:
    """Every word of the filter appears in some cell of the row (case-insensitive)."""
    if not filter_text:
        return True
    row = " ".join(str(c) for c in cells).lower()
    return all(word in row for word in filter_text.split())
