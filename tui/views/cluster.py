"""1 Cluster: the nodes (role, state, address, GPUs, load), Raft, and the cluster's story."""

from __future__ import annotations

import time

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.markup import escape
from textual.widgets import Log, Static

from ..client import ApiError
from ..format import gib, percent
from ..modals import ConfirmModal, SecretModal
from ..table import LiveTable
from .base import View

__all__ = ["ClusterView"]

COLUMNS = ("NODE", "STATE", "ROLE", "GPUS", "LOAD", "RAM", "INST", "ADDRESS", "VERSION")


class ClusterView(View):
    MODE = "cluster"
    AUTO_FOCUS = "#nodes"
    TOPICS = frozenset({"nodes", "raft", "instances", "telemetry", "log"})
    HELP_TEXT = ("Every node of the cluster as the attached node (marked *) sees it. A node "
                 "that stops answering shows as unreachable within a second.")
    BINDINGS = [
        Binding("enter", "show_gpus", "GPUs of node", id="cluster.gpus"),
        Binding("a", "attach", "Attach here", id="cluster.attach"),
        Binding("d", "drain", "Drain", id="cluster.drain"),
        Binding("ctrl+d", "remove", "Remove", id="cluster.remove"),
        Binding("t", "join_token", "Join token", id="cluster.token"),
    ]

    def compose_body(self) -> ComposeResult:
        yield Static(id="summary")
        # Load and RAM change every second: the line-API table (see table.py) redraws cheaply.
        yield LiveTable(COLUMNS, id="nodes")
        yield Log(id="events", max_lines=500, auto_scroll=True)

    def on_mount(self) -> None:
        super().on_mount()
        self._log_seen = 0
        self.query_one("#events", Log).border_title = "events"

    def redraw(self, topics: set[str]) -> None:
        model = self.app.model
        self.query_one("#summary", Static).update(self._summary())
        if topics & {"nodes", "raft", "instances", "telemetry"}:
            rows = self.visible((node["id"], self._row(node)) for node in
                                sorted(model.nodes.values(), key=lambda n: n.get("name", n["id"])))
            self.query_one("#nodes", LiveTable).set_rows(rows)
        if "log" in topics:
            lines = model.new_log_lines(self._log_seen)
            self._log_seen = model.log_total
            if lines:
                self.query_one("#events", Log).write_lines(
                    f"{time.strftime('%H:%M:%S', time.localtime(t))} {line}" for t, line in lines)

    def _row(self, node: dict) -> tuple:
        model = self.app.model
        used, total = model.node_memory(node["id"])
        name = ("* " if node["id"] == model.node_id else "  ") + node.get("name", node["id"])
        return (name, model.node_state(node["id"]), model.role(node),
                str(len(model.gpus_of(node["id"]))), percent(model.node_load(node["id"])),
                f"{gib(used)}/{gib(total)}", str(len(model.instances_on(node["id"]))),
                (node.get("api_url") or "-").removeprefix("http://"), node.get("version", "-"))

    def _summary(self) -> str:
        model = self.app.model
        states = [model.node_state(n) for n in model.nodes]
        ready = states.count("ready")
        down = len(states) - ready
        gpus = sum(len(model.gpus_of(n)) for n in model.nodes)
        raft = model.raft
        leader = model.leader_node_id()
        leader_name = model.nodes[leader].get("name", leader) if leader else (
            raft.get("leader") or "none")
        attached = model.nodes.get(model.node_id or "", {})
        quorum = "yes" if raft.get("has_quorum") else "NO"
        leader_name, attached_name = escape(str(leader_name)), escape(
            str(attached.get("name", model.node_id or "-")))
        return (f"[b]{len(states)} node(s)[/b], {ready} ready"
                + (f", [b]{down} not ready[/b]" if down else "")
                + f" · {gpus} GPU(s) · {len(model.models)} model(s) · "
                f"{len(model.instances)} instance(s)\n"
                f"Raft: leader [b]{leader_name}[/b] · term {raft.get('term', '-')} · quorum "
                f"{quorum} · {len(raft.get('members') or [])} member(s) · attached: "
                f"[b]{attached_name}[/b] "
                f"({escape(str(attached.get('api_url', self.app.client.url)))})")

    async def action_show_gpus(self) -> None:
        key = self.query_one("#nodes", LiveTable).cursor_key
        if key is None:
            return
        await self.app.switch_mode("gpus")
        self.app.screen.focus_node(key)      # type: ignore[attr-defined]

    def action_attach(self) -> None:
        key = self.query_one("#nodes", LiveTable).cursor_key
        node = self.app.model.nodes.get(key or "")
        if node and node.get("api_url"):
            self.app.attach(node["api_url"])

    def _node(self) -> dict | None:
        return self.app.model.nodes.get(self.query_one("#nodes", LiveTable).cursor_key or "")

    @work(group="cluster-actions", exit_on_error=False)
    async def action_drain(self) -> None:
        node = self._node()
        if node is None:
            return
        undo = bool(node.get("draining"))
        question = (f"Let {node['name']} take instances again?" if undo else
                    f"Drain {node['name']}? Its instances move to other nodes and nothing new "
                    "is placed there until it is undrained (d again).")
        if await self.app.push_screen_wait(ConfirmModal(question, yes="Undrain" if undo
                                                        else "Drain", destructive=not undo)):
            await self.call_api(f"{'undraining' if undo else 'draining'} {node['name']}", "POST",
                             f"/api/nodes/{node['id']}/drain", {"undo": undo})

    @work(group="cluster-actions", exit_on_error=False)
    async def action_remove(self) -> None:
        node = self._node()
        if node is None:
            return
        if await self.app.push_screen_wait(ConfirmModal(
                f"Remove {node['name']} from the cluster? Its instances move elsewhere; to "
                "come back it needs a wiped data dir and a new join token.", yes="Remove",
                destructive=True)):
            await self.call_api(f"removing {node['name']}", "DELETE", f"/api/nodes/{node['id']}")

    @work(group="cluster-actions", exit_on_error=False)
    async def action_join_token(self) -> None:
        try:
            reply = await self.app.client.post("/api/join-tokens", {})
        except ApiError as exc:
            self.notify("this node has no join API (POST /api/join-tokens)" if exc.missing_route
                        else f"join token: {exc}", severity="error", timeout=8)
            return
        await self.app.push_screen_wait(SecretModal(
            reply["token"], "Join token (gpumesh up --join HOST --token TOKEN)"))
    async def on_live_table_selected(self, event: LiveTable.Selected) -> None:
        await self.action_show_gpus()
