"""The console app: six views (modes), one event stream, reconnection, help and palette.

Data flow: one exclusive async worker reads `/api/events` from the attached node and applies
each event to `ClusterModel`; the topics an event changed bump `topic_seq` and `state_seq`;
the visible view redraws what it shows (hidden views catch up when shown). When the stream
breaks, the worker tries the same node and then the other nodes the cluster listed, with a
capped, jittered backoff; `c` offers the nodes to pick one by hand.
"""

from __future__ import annotations

import asyncio
import os
import random
import sys
import time
from functools import partial
from typing import Any, Callable, Iterable

from textual import work
from textual.app import App, SystemCommand
from textual.binding import Binding
from textual.reactive import reactive
from textual.screen import Screen

from .client import ApiError, NodeClient
from .modals import HelpModal, NodePickerModal
from .store import ClusterModel
from .views.base import View
from .views.cluster import ClusterView
from .views.gpus import GpusView
from .views.instances import InstancesView
from .views.keys import KeysView
from .views.models import ModelsView
from .views.usage import UsageView
from .widgets import VIEWS

__all__ = ["GpumeshConsole"]

HISTORY_S = 300                 # chart history fetched on attach: "the last minutes"
_MAX_BACKOFF_S = 15.0
_TTY_CHECK_S = 5.0


class GpumeshConsole(App[int]):
    TITLE = "gpumesh"
    CSS_PATH = "console.tcss"
    MODES = {"cluster": ClusterView, "gpus": GpusView, "models": ModelsView,
             "instances": InstancesView, "keys": KeysView, "usage": UsageView}
    DEFAULT_MODE = "cluster"
    BINDINGS = [
        *[Binding(digit, f"switch_mode('{mode}')", label, show=False, id=f"view.{mode}")
          for mode, digit, label in VIEWS],
        Binding("question_mark", "help", "Help", id="app.help"),
        Binding("colon", "command_palette", "Commands", show=False, id="app.palette"),
        Binding("c", "pick_node", "Connect", show=False, id="app.connect"),
        Binding("q", "quit", "Quit", id="app.quit"),
    ]

    state_seq = reactive(0)
    link_text = reactive("◌ connecting")

    def __init__(self, url: str, api_key: str | None, *, clock: Callable[[], float] = time.time,
                 history_s: float = HISTORY_S, theme: str | None = None,
                 watchdog: bool = True) -> None:
        super().__init__()
        self.client = NodeClient(url, api_key)
        self.model = ClusterModel(clock)
        self.topic_seq: dict[str, int] = {}
        self.history_s = history_s
        self.requested_theme = theme
        self.watchdog = watchdog
        self.connection = "connecting"       # connecting | live | reconnecting
        self.attached_url: str | None = None
        self.failures = 0

    # --- start and stop --------------------------------------------------------------------

    def on_mount(self) -> None:
        # 16-colour terminals: the ANSI theme uses the terminal's own palette (the default
        # theme collapses to grey on grey there; CONSOLE-NOTES §6).
        if self.requested_theme:
            self.theme = self.requested_theme
        elif self.console.color_system == "standard":
            self.theme = "ansi-dark"
        if self.watchdog and not self.is_headless:
            self.set_interval(_TTY_CHECK_S, self._check_tty)
        self.attach(self.client.url)

    async def on_unmount(self) -> None:
        await self.client.close()

    def _check_tty(self) -> None:
        """After an SSH drop Textual's input thread can spin on a closed stdin: leave."""
        try:
            alive = os.isatty(sys.__stdin__.fileno())
        except (ValueError, OSError, AttributeError):
            alive = False
        if not alive:
            self.exit(0)

    async def action_quit(self) -> None:
        self.exit(0)

    # --- the stream ------------------------------------------------------------------------

    def attach(self, url: str) -> None:
        """(Re)attach to the node at `url`; the stream worker replaces any running one."""
        self.client.url = url.rstrip("/")
        self.failures = 0
        self._stream(self.client.url)

    @work(exclusive=True, group="stream", exit_on_error=False)
    async def _stream(self, url: str) -> None:
        while True:
            self.client.url = url
            self._set_link("connecting", url)
            problem = await self._read_stream(url)
            self.failures += 1
            url = self._next_url(url)
            self._set_link("reconnecting", url)
            if self.failures == 1:
                others = len(self.model.known_nodes()) - 1
                self.notify(f"lost the node: {problem}" + (
                    f" · trying the {others} other node(s) it listed (c: choose)"
                    if others > 0 else ""), severity="warning", timeout=6)
            await asyncio.sleep(self._backoff())

    async def _read_stream(self, url: str) -> str:
        """Apply events until the stream ends; returns why it ended."""
        try:
            # The window again on every attach: it replaces what the charts held, so a gap
            # while reconnecting is filled from the node's own ring buffers.
            async for event, data in self.client.events(url, history=self.history_s):
                self.apply(event, data)
                if event == "snapshot":
                    self.failures = 0
                    self.attached_url = url
                    self._set_link("live", url)
        except ApiError as exc:
            return str(exc)
        return "the node closed the stream (stopping?)"

    def apply(self, event: str, data: Any) -> None:
        topics = self.model.apply(event, data)
        if event == "telemetry":
            topics.add("clock")              # uptimes and expiries move with the seconds
        for topic in topics:
            self.topic_seq[topic] = self.topic_seq.get(topic, 0) + 1
        if topics:
            self.state_seq += 1

    def _next_url(self, url: str) -> str:
        """The next node the cluster listed, in turn (the same one again if it is alone)."""
        urls = [u for _, _, u in self.model.known_nodes()]
        if url not in urls:
            urls.insert(0, url)
        return urls[(urls.index(url) + 1) % len(urls)]

    def _backoff(self) -> float:
        rounds = self.failures // max(1, len(self.model.known_nodes()))
        return min(_MAX_BACKOFF_S, 0.25 * 2 ** rounds) * (1 + random.random() / 2)

    def _set_link(self, state: str, url: str) -> None:
        self.connection = state
        if state == "live":                  # the node that answered says who it is
            node = self.model.nodes.get(self.model.node_id or "")
        else:
            node = next((n for n in self.model.nodes.values() if n.get("api_url") == url), None)
        where = node.get("name", url) if node else url.removeprefix("http://")
        self.link_text = {
            "live": f"● live · {where} ",
            "connecting": f"◌ connecting to {where} ",
            "reconnecting": f"○ reconnecting to {where} (try {self.failures}) · c: choose ",
        }[state]

    # --- actions ---------------------------------------------------------------------------

    @work(group="pick-node", exclusive=True, exit_on_error=False)
    async def action_pick_node(self) -> None:
        nodes = [(name, url, self.model.node_state(node_id))
                 for node_id, name, url in self.model.known_nodes()]
        if not nodes:
            self.notify("no other node is known yet", timeout=3)
            return
        why = "" if self.connection == "live" else "the attached node does not answer"
        url = await self.push_screen_wait(NodePickerModal(nodes, self.client.url, why))
        if url:
            self.attach(url)

    def action_help(self) -> None:
        if isinstance(self.screen, HelpModal):
            self.pop_screen()
            return
        sections = [("Everywhere", _keys(self, self.BINDINGS)),
                    ("In every view", _keys(self, View.BINDINGS))]
        for mode, digit, label in VIEWS:
            view = self.MODES[mode]
            sections.append((f"{digit} {label}", _keys(self, view.BINDINGS)))   # type: ignore[union-attr]
        sections.append(("In tables", [("↑ ↓ pgup pgdn", "move"), ("home end", "first, last"),
                                       ("click a column", "sort by it (GPUs)")]))
        sections.append(("In dialogs", [("tab / shift+tab", "next, previous field"),
                                        ("enter / ctrl+s", "apply"), ("esc", "cancel")]))
        about = getattr(self.screen, "HELP_TEXT", "")
        self.push_screen(HelpModal(sections, about))

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        for mode, digit, label in VIEWS:
            yield SystemCommand(f"{label} view", f"switch to the {label} view (key {digit})",
                                partial(self.switch_mode, mode))
        yield SystemCommand("Connect to another node", "attach the console to another node "
                            "(key c)", self.action_pick_node)
        yield SystemCommand("Help", "every key binding (key ?)", self.action_help)
        for binding in getattr(screen, "BINDINGS", []):
            if isinstance(binding, Binding) and binding.show and binding.action != "filter":
                yield SystemCommand(binding.description, f"key {binding.key}",
                                    partial(screen.run_action, binding.action))
        yield from super().get_system_commands(screen)


def _keys(app: App, bindings: Iterable[Any]) -> list[tuple[str, str]]:
    found = []
    for binding in bindings:
        if isinstance(binding, Binding):
            keys = ", ".join(app.get_key_display(Binding(k.strip(), binding.action))
                             for k in binding.key.split(","))
            found.append((keys, binding.description or binding.action))
    return found
