"""The console (gpumesh.tui) driven by Textual's Pilot against a real `gpumesh up` daemon.

One daemon for the module, with a tiny llama.cpp model deployed through the CLI, so every
view has real content; each test starts a console (80×24 unless it says otherwise) and works
it with keys as a person would, then checks the screen's widgets and the daemon's state.
Waits are bounded (`until`), never sleeps tuned to this machine's speed.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any, Callable

import openai
import pytest
from textual.widgets import DataTable, Input, Log, Static

from harness import Cluster, Daemon, pid_alive
from tinymodels import write_tiny_gguf
from gpumesh.tui.app import GpumeshConsole
from gpumesh.tui.table import LiveTable
from gpumesh.tui.modals import (ConfirmModal, DeployModal, HelpModal, NewKeyModal,
                                NumberModal, SecretModal)

WAIT_S = 60.0


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tui")


@pytest.fixture(scope="module")
def node(workdir: Path):
    daemon = Daemon(workdir / "data")
    daemon.start()
    model = write_tiny_gguf(workdir / "tiny.gguf")
    result = daemon.cli("deploy", str(model), "--name", "tiny", "--wait", "--timeout", "90")
    assert result.returncode == 0, result.stderr + daemon.output()
    yield daemon
    daemon.kill()


async def until(pilot: Any, condition: Callable[[], Any], what: str,
                timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await pilot.pause(0.05)


def rows(app: GpumeshConsole, table_id: str) -> dict[str, list[str]]:
    table = app.screen.query_one(f"#{table_id}")
    if isinstance(table, LiveTable):
        return {key: list(cells) for key, cells in table.rows.items()}
    assert isinstance(table, DataTable)
    return {key.value: [str(c) for c in table.get_row(key)] for key in table.rows}


def console(node: Daemon, **kwargs: Any) -> GpumeshConsole:
    return GpumeshConsole(node.url, node.admin_key, **kwargs)


async def live(pilot: Any) -> None:
    app = pilot.app
    await until(pilot, lambda: app.connection == "live" and app.model.ready, "the stream")


def test_cluster_view_shows_the_node_and_raft(node: Daemon) -> None:
    async def scenario() -> None:
        app = console(node)
        async with app.run_test(size=(80, 24)) as pilot:
            await live(pilot)
            assert app.current_mode == "cluster"
            node_id = app.model.node_id
            await until(pilot, lambda: node_id in rows(app, "nodes"), "the node row")
            cells = rows(app, "nodes")[node_id]
            assert cells[0].startswith("* ")           # the node the console is attached to
            assert cells[1:3] == ["ready", "leader"]
            summary = str(app.screen.query_one("#summary", Static).render())
            assert "quorum yes" in summary and "1 node(s)" in summary
            events = app.screen.query_one("#events", Log)
            assert any("attached to node" in line for line in events.lines)
            # Telemetry arrives once a second: the RAM column fills from the live sample.
            await until(pilot, lambda: app.model.telemetry.get(node_id, {}).get("source")
                        == "telemetry", "a telemetry sample")
            await pilot.press("q")
        assert app.return_code == 0

    asyncio.run(scenario())


def test_every_view_by_digit_and_palette(node: Daemon) -> None:
    async def scenario() -> None:
        app = console(node)
        async with app.run_test(size=(80, 24)) as pilot:
            await live(pilot)
            node_id = app.model.node_id
            await pilot.press("2")
            assert app.current_mode == "gpus"
            await until(pilot, lambda: f"node:{node_id}" in rows(app, "gpus"), "the node row")
            assert "CPU only" in rows(app, "gpus")[f"node:{node_id}"][1]   # this machine
            await pilot.press("3")
            await until(pilot, lambda: "tiny" in rows(app, "models"), "the model row")
            assert rows(app, "models")["tiny"][1:3] == ["running", "1/1"]
            await pilot.press("4")
            await until(pilot, lambda: rows(app, "instances"), "an instance row")
            instance = next(iter(rows(app, "instances").values()))
            assert instance[1:3] == ["tiny", "running"] and instance[5].isdigit()
            await pilot.press("5")
            await until(pilot, lambda: rows(app, "keys"), "the admin key")
            assert [r[2] for r in rows(app, "keys").values()] == ["admin"]
            await pilot.press("6")
            assert app.current_mode == "usage"
            # The command palette switches views too, and `:` opens it like ctrl+p.
            await pilot.press("colon")
            await until(pilot, lambda: app.screen.id == "--command-palette"
                        or type(app.screen).__name__ == "CommandPalette", "the palette")
            await pilot.press(*"Cluster view")
            await pilot.pause(0.3)
            await pilot.press("enter")
            await until(pilot, lambda: app.current_mode == "cluster", "the cluster view")
            await pilot.press("1", "q")
        assert app.return_code == 0

    asyncio.run(scenario())


def test_help_filter_and_escape(node: Daemon) -> None:
    async def scenario() -> None:
        app = console(node)
        async with app.run_test(size=(80, 24)) as pilot:
            await live(pilot)
            await pilot.press("question_mark")
            assert isinstance(app.screen, HelpModal)
            text = str(app.screen.query_one(Static).render())
            for words in ("Fold node", "Deploy", "Restart", "New key", "Filter", "Quit"):
                assert words in text
            await pilot.press("escape")
            assert not isinstance(app.screen, HelpModal)
            await pilot.press("3")
            await until(pilot, lambda: "tiny" in rows(app, "models"), "the model row")
            await pilot.press("slash", *"nothing-like-it")
            await until(pilot, lambda: not rows(app, "models"), "the filter to hide the row")
            assert app.screen.query_one("#filter", Input).has_focus
            await pilot.press("q")                    # typed into the filter, not quitting
            assert app.is_running
            await pilot.press("escape")               # clears and closes the filter
            await until(pilot, lambda: "tiny" in rows(app, "models"), "the row again")
            assert not app.screen.query_one("#filter", Input).display
            await pilot.press("q")
        assert app.return_code == 0

    asyncio.run(scenario())


def test_models_stop_scale_deploy_delete(node: Daemon, workdir: Path) -> None:
    second = write_tiny_gguf(workdir / "second.gguf")

    async def scenario() -> None:
        app = console(node)
        async with app.run_test(size=(80, 24)) as pilot:
            await live(pilot)
            await pilot.press("3")
            await until(pilot, lambda: "tiny" in rows(app, "models"), "the model row")
            table = app.screen.query_one("#models", DataTable)
            table.move_cursor(row=table.get_row_index("tiny"))
            # Stop: confirm with y; the stream brings the new status back.
            await pilot.press("x")
            await until(pilot, lambda: isinstance(app.screen, ConfirmModal), "the question")
            await pilot.press("y")
            await until(pilot, lambda: rows(app, "models")["tiny"][1] == "stopped", "stopped")
            # Scale back to 1 with the number dialog.
            await pilot.press("s")
            await until(pilot, lambda: isinstance(app.screen, NumberModal), "the dialog")
            await pilot.press("ctrl+a", "ctrl+k", "1", "enter")
            await until(pilot, lambda: rows(app, "models")["tiny"][2].endswith("/1"), "1 wanted")
            # Deploy: the first ctrl+s shows the evaluation, the second deploys.
            await pilot.press("d")
            await until(pilot, lambda: isinstance(app.screen, DeployModal), "the form")
            await pilot.press(*str(second))
            await pilot.press("tab", *"second", "tab", "ctrl+a", "ctrl+k", "0")
            await pilot.press("ctrl+s")
            form = app.screen
            await until(pilot, lambda: isinstance(app.screen, DeployModal)
                        and form.evaluated is not None, "the evaluation")
            # The scheduler's plan, before anything is stored: where it would run, and why.
            evaluation = str(form.query_one("#evaluation", Static).render())
            assert "needs" in evaluation and "replica 1 →" in evaluation
            assert "fits" in evaluation and "second" not in app.model.models
            await pilot.press("ctrl+s")
            await until(pilot, lambda: "second" in rows(app, "models"), "the new model")
            assert rows(app, "models")["second"][1:3] == ["stopped", "0/0"]
            # Delete it, with confirmation.
            table.move_cursor(row=table.get_row_index("second"))
            await pilot.press("ctrl+d")
            await until(pilot, lambda: isinstance(app.screen, ConfirmModal), "the question")
            await pilot.press("y")
            await until(pilot, lambda: "second" not in rows(app, "models"), "the deletion")
            await until(pilot, lambda: rows(app, "models")["tiny"][1] == "running",
                        "tiny running again")
            await pilot.press("q")

    asyncio.run(scenario())
    code, body = node.api("/api/models")
    assert [m["name"] for m in body["data"]] == ["tiny"]


def test_instances_log_and_keys_dialogs(node: Daemon) -> None:
    async def scenario() -> None:
        app = console(node)
        async with app.run_test(size=(80, 24)) as pilot:
            await live(pilot)
            await pilot.press("4")
            await until(pilot, lambda: rows(app, "instances"), "an instance row")
            log = app.screen.query_one("#log", Log)
            # The log pane follows the instance under the cursor: its engine's own output.
            await until(pilot, lambda: log.line_count > 3, "the engine's log")
            assert not any("no logs API" in line for line in log.lines)
            # Restart (r, confirmed): the daemon's agent starts a new engine in its place.
            instance_id = next(iter(rows(app, "instances")))
            before = dict(app.model.instances[instance_id])
            await pilot.press("r")
            await until(pilot, lambda: isinstance(app.screen, ConfirmModal), "the question")
            await pilot.press("y")

            def restarted() -> bool:
                now = app.model.instances[instance_id]
                return (now.get("restart_handled") == 1 and now["state"] == "running"
                        and now["pid"] != before["pid"])
            await until(pilot, restarted, "the engine to restart")
            assert not pid_alive(before["pid"])           # the old engine is gone
            answer = await asyncio.to_thread(node.request, "POST", "/v1/chat/completions", {
                "model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]})
            assert answer[0] == 200, answer
            await pilot.press("f")
            assert not log.auto_scroll and "(paused)" in str(log.border_title)
            await pilot.press("f", "enter")
            assert app.screen.maximized is log
            await pilot.press("escape")
            await pilot.press("5")
            await until(pilot, lambda: rows(app, "keys"), "the admin key")
            await pilot.press("n")
            await until(pilot, lambda: isinstance(app.screen, NewKeyModal), "the key form")
            await pilot.press("ctrl+s")              # no name yet: refused in the form
            assert isinstance(app.screen, NewKeyModal)
            assert "name" in str(app.screen.query_one("#error", Static).render())
            await pilot.press(*"console-key", "tab", "tab", *"7", "ctrl+s")
            # The key, once, in a dialog with a copy button; it works at once.
            await until(pilot, lambda: isinstance(app.screen, SecretModal), "the new key")
            created["key"] = app.screen.key
            assert created["key"].startswith("gm-")
            await pilot.press("c")                   # copy (OSC 52): a notice, no error
            await pilot.press("escape")
            await until(pilot, lambda: any(r[1] == "console-key" for r in
                                           rows(app, "keys").values()), "the key's row")
            key_id, cells = next((k, r) for k, r in rows(app, "keys").items()
                                 if r[1] == "console-key")
            assert "(7d)" in cells[5] or "(6d)" in cells[5]      # expires in a week
            assert (await asyncio.to_thread(node.request, "GET", "/v1/models",
                                            key=created["key"]))[0] == 200
            table = app.screen.query_one("#keys", DataTable)
            table.move_cursor(row=table.get_row_index(key_id))
            await pilot.press("x")
            await until(pilot, lambda: isinstance(app.screen, ConfirmModal), "the question")
            await pilot.press("y")
            await until(pilot, lambda: key_id not in rows(app, "keys"), "the revocation")
            assert (await asyncio.to_thread(node.request, "GET", "/v1/models",
                                            key=created["key"]))[0] == 401
            await pilot.press("q")
        assert app.return_code == 0

    created: dict[str, str] = {}
    asyncio.run(scenario())


def test_usage_view_counts_requests_as_they_are_served(node: Daemon) -> None:
    async def scenario() -> None:
        app = console(node)
        async with app.run_test(size=(80, 24)) as pilot:
            await live(pilot)
            await pilot.press("6")
            api = openai.OpenAI(base_url=node.url + "/v1", api_key=node.admin_key,
                                max_retries=0, timeout=60)
            for _ in range(3):
                await asyncio.to_thread(api.chat.completions.create, model="tiny",
                                        max_tokens=4, messages=[{"role": "user",
                                                                 "content": "hi"}])
            # The node folds its usage into the state about once a second; the stream
            # brings the hour's rows, and the view shows the rate of the last minute.
            await until(pilot, lambda: any(r[0] == "tiny" and r[5] not in ("-", "0.0")
                                           for r in rows(app, "usage").values()), "a rate")
            await pilot.press("1", "6")               # showing the view asks for totals
            await until(pilot, lambda: any(r[0] == "tiny" and r[2].isdigit()
                                           and int(r[2]) >= 3
                                           for r in rows(app, "usage").values()),
                        "the 24-hour totals")
            assert app.model.usage_rpm and app.model.usage_rpm[-1] is not None
            await pilot.press("q")
        assert app.return_code == 0

    asyncio.run(scenario())


def test_console_reattaches_to_a_restarted_node(workdir: Path) -> None:
    daemon = Daemon(workdir / "restart")
    daemon.start()
    try:
        async def scenario() -> None:
            app = GpumeshConsole(daemon.url, daemon.admin_key)
            async with app.run_test(size=(80, 24)) as pilot:
                await live(pilot)
                first = app.model.node_id
                await asyncio.to_thread(daemon.stop)
                await until(pilot, lambda: app.connection == "reconnecting", "the loss")
                assert "reconnecting" in app.link_text
                await asyncio.to_thread(daemon.start)
                await until(pilot, lambda: app.connection == "live", "the node again")
                assert app.model.node_id == first
                await pilot.press("q")
            assert app.return_code == 0

        asyncio.run(scenario())
    finally:
        daemon.kill()


def test_console_moves_to_another_node_when_its_node_goes_away(tmp_path: Path) -> None:
    """A real two-node cluster (`--join`): the console attached to the founder drains and
    undrains the other node, then the founder is killed; the console shows it unreachable
    and moves to the node the cluster listed."""
    cluster = Cluster(tmp_path, 2)
    cluster.start()
    first, second = cluster.nodes
    try:
        async def scenario() -> None:
            app = GpumeshConsole(first.url, first.admin_key)
            async with app.run_test(size=(80, 24)) as pilot:
                await live(pilot)
                founder = app.model.node_id
                other = next(n for n in app.model.nodes if n != founder)
                await until(pilot, lambda: len(rows(app, "nodes")) == 2, "both nodes")
                table = app.screen.query_one("#nodes", LiveTable)
                table.move_to(other)
                await pilot.press("d")
                await until(pilot, lambda: isinstance(app.screen, ConfirmModal), "the question")
                await pilot.press("y")
                await until(pilot, lambda: rows(app, "nodes")[other][1] == "draining",
                            "the drain")
                await pilot.press("d", "y")
                await until(pilot, lambda: rows(app, "nodes")[other][1] == "ready", "undrained")
                await asyncio.to_thread(first.kill)
                await until(pilot, lambda: app.connection == "live"
                            and app.model.node_id == other, "the other node")
                assert app.client.url == second.url and "n1" in app.link_text
                await until(pilot, lambda: rows(app, "nodes")[founder][1] == "unreachable",
                            "the founder shown unreachable")
                attached = [line for _, line in app.model.log if "attached to node" in line]
                assert attached[-2:] == ["attached to node n0", "attached to node n1"]
                await pilot.press("q")
            assert app.return_code == 0

        asyncio.run(scenario())
    finally:
        cluster.kill_all()
