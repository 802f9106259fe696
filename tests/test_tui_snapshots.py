"""SVG snapshots of the console's main views (pytest-textual-snapshot).

A real daemon's content changes from run to run (ids, ports, times, load), so these render
a fixed recorded state instead: `simcluster.SimCluster` serves the event stream with the
daemon's record shapes and readings that are a function of a step counter (no live ticks),
and the console's clock is frozen. The time zone is pinned for the clock columns.
Update after a deliberate change of the screens: `pytest tests/test_tui_snapshots.py
--snapshot-update`, then look at the SVGs.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import pytest
from textual.widgets import Input, Log

from simcluster import ADMIN_KEY, FIXED_TIME, SimCluster
from gpumesh.tui.app import GpumeshConsole
from gpumesh.tui.store import GpuRef

WAIT_S = 30.0


@pytest.fixture(scope="module")
def sim():
    cluster = SimCluster(nodes=3, gpus=2, live=False, history=150, models=4).start()
    yield cluster
    cluster.stop()


@pytest.fixture(autouse=True)
def utc():
    before = os.environ.get("TZ")
    os.environ["TZ"] = "UTC"
    time.tzset()
    yield
    if before is None:
        del os.environ["TZ"]
    else:
        os.environ["TZ"] = before
    time.tzset()


def app_for(sim: SimCluster) -> GpumeshConsole:
    return GpumeshConsole(sim.url, ADMIN_KEY, clock=lambda: FIXED_TIME)


async def until(pilot: Any, condition: Callable[[], Any], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await pilot.pause(0.05)


def in_view(mode: str, *keys: str, ready: Callable[[Any], Any] = lambda app: True):
    """run_before: wait for the recorded state and its chart history, go to `mode`, press
    `keys`, wait for `ready(app)`, and stop every cursor blinking."""
    async def run_before(pilot: Any) -> None:
        app = pilot.app
        await until(pilot, lambda: app.connection == "live" and app.model.ready
                    and any(r.index is not None for r in app.model.series), "the recorded state")
        await app.switch_mode(mode)
        await pilot.pause()
        if keys:
            await pilot.press(*keys)
        await until(pilot, lambda: ready(app), f"the {mode} view")
        for box in app.screen.query(Input):
            box.cursor_blink = False
        await pilot.pause()
    return run_before


def test_cluster_80x24(snap_compare: Any, sim: SimCluster) -> None:
    assert snap_compare(app_for(sim), run_before=in_view("cluster"))


def test_gpus_80x24(snap_compare: Any, sim: SimCluster) -> None:
    # The cursor on the first GPU: its own charts, not the node's.
    assert snap_compare(app_for(sim), run_before=in_view(
        "gpus", "down", ready=lambda app: app.screen._selected() == GpuRef(sim.node_id(0), 0)))


def test_gpus_folded_and_wide_160x48(snap_compare: Any, sim: SimCluster) -> None:
    assert snap_compare(app_for(sim), terminal_size=(160, 48), run_before=in_view(
        "gpus", "down", "down", "down", "space",
        ready=lambda app: sim.node_id(1) in app.screen.folded))


def test_models_80x24(snap_compare: Any, sim: SimCluster) -> None:
    assert snap_compare(app_for(sim), run_before=in_view("models", "down"))


def test_instances_with_log_80x24(snap_compare: Any, sim: SimCluster) -> None:
    assert snap_compare(app_for(sim), run_before=in_view(
        "instances", ready=lambda app: app.screen.query_one("#log", Log).line_count >= 5))


def test_deploy_form_80x24(snap_compare: Any, sim: SimCluster) -> None:
    assert snap_compare(app_for(sim), run_before=in_view(
        "models", "d", *"org/phi-4-GGUF:phi-4-Q4_K_M.gguf",
        ready=lambda app: type(app.screen).__name__ == "DeployModal"))


def test_help_80x24(snap_compare: Any, sim: SimCluster) -> None:
    assert snap_compare(app_for(sim), run_before=in_view(
        "gpus", "question_mark", ready=lambda app: type(app.screen).__name__ == "HelpModal"))


@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux (a real terminal)")
def test_16_colour_terminal_gets_only_the_16_ansi_colours(sim: SimCluster, tmp_path: Path) -> None:
    """SVG snapshots are always truecolor, so this runs the console in a real terminal (tmux)
    told to use 16 colours, and reads the screen back with its escape codes: the ANSI theme
    is chosen by itself, and no 256-colour or truecolor sequence is drawn."""
    tmux = ["tmux", "-L", f"gm-tui16-{uuid.uuid4().hex[:8]}"]     # a private server
    session = "console"
    script = f"from gpumesh.tui import run; run({sim.url!r}, {ADMIN_KEY!r})"
    command = f"TEXTUAL_COLOR_SYSTEM=standard exec {sys.executable} -c \"{script}\""
    subprocess.run([*tmux, "new-session", "-d", "-s", session, "-x", "80", "-y", "24",
                    "-c", str(tmp_path), command], check=True)
    try:
        screen = ""
        deadline = time.monotonic() + WAIT_S
        while "● live" not in screen and time.monotonic() < deadline:
            time.sleep(0.2)
            screen = _capture(tmux, session)
        assert "● live" in screen, screen
        subprocess.run([*tmux, "send-keys", "-t", session, "2"], check=True)
        deadline = time.monotonic() + WAIT_S
        while "H200" not in _capture(tmux, session) and time.monotonic() < deadline:
            time.sleep(0.2)
        screen = _capture(tmux, session, escapes=True)
        assert "H200" in screen
        codes = [set(c.split(";")) for c in re.findall(r"\x1b\[([0-9;]*)m", screen)]
        assert codes and not [c for c in codes if c & {"38", "48"}], "256/true colour drawn"
        colours = set().union(*codes) - {"", "0", "1", "2", "3", "4", "7", "22", "23", "24",
                                         "27", "39", "49"}
        assert colours and all(30 <= int(c) <= 37 or 40 <= int(c) <= 47 or 90 <= int(c) <= 97
                               or 100 <= int(c) <= 107 for c in colours), colours
    finally:
        subprocess.run([*tmux, "kill-server"], capture_output=True)


def _capture(tmux: list[str], session: str, escapes: bool = False) -> str:
    args = [*tmux, "capture-pane", "-p", "-t", session] + (["-e"] if escapes else [])
    return subprocess.run(args, capture_output=True, text=True).stdout
