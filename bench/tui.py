"""The console's figures: start to first full paint, and its CPU use while charts update at 1 Hz.

Prints numbers; passes or fails nothing. Run: `.venv/bin/python bench/tui.py`.

The cluster is simulated: a real HTTP server in this process (tests/simcluster.py) serves
`/api/events` with the daemon's record shapes for 16 nodes × 8 GPUs, a 5-minute telemetry
history on attach, then a 1 Hz telemetry tick. The console is the real `gpumesh tui` code in
its own process inside tmux (a real terminal), so start-up includes Python, the imports,
connecting, the snapshot and the paint. "First full paint": the screen shows the stream is
live and the whole cluster is counted (read back with `tmux capture-pane`, polled every
20 ms). CPU: the console process's user+system time over a window, as % of one core.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from simcluster import ADMIN_KEY, SimCluster  # noqa: E402

NODES, GPUS = 16, 8
STARTS = 5                  # start-up runs per terminal size
CPU_WINDOW_S = 30.0
SIZES = ((80, 24), (200, 50))
PAINTED = ("● live", f"{NODES} node(s)")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# A private tmux server (its own socket) for this run, kept up by one idle session: the
# consoles come and go without racing the server's own exit, and no one else's tmux is touched.
TMUX = ("tmux", "-L", f"gm-bench-{uuid.uuid4().hex[:8]}")


class Console:
    """`gpumesh tui` in a detached tmux session of a given size."""

    def __init__(self, url: str, size: tuple[int, int]) -> None:
        self.session = f"gm-bench-{uuid.uuid4().hex[:8]}"
        self.size = size
        self.url = url
        self.pid = 0

    def start(self) -> float:
        """Start the console; returns the seconds until its first full paint."""
        script = (f"from gpumesh.tui import run; import sys; "
                  f"sys.exit(run({self.url!r}, {ADMIN_KEY!r}))")
        command = f"cd {tempfile.gettempdir()} && exec {sys.executable} -c \"{script}\""
        started = time.monotonic()
        subprocess.run([*TMUX, "new-session", "-d", "-s", self.session, "-x",
                        str(self.size[0]), "-y", str(self.size[1]), command], check=True)
        self.pid = int(self._tmux("display-message", "-p", "-t", self.session,
                                  "#{pane_pid}").strip())
        deadline = started + 60
        while time.monotonic() < deadline:
            screen = self.screen()
            if all(marker in screen for marker in PAINTED):
                return time.monotonic() - started
            time.sleep(0.02)
        raise TimeoutError(f"no full paint within 60 s:\n{self.screen()}")

    def screen(self) -> str:
        return self._tmux("capture-pane", "-p", "-t", self.session)

    def keys(self, *keys: str) -> None:
        self._tmux("send-keys", "-t", self.session, *keys)

    def cpu_percent(self, seconds: float) -> float:
        before, t0 = cpu_seconds(self.pid), time.monotonic()
        time.sleep(seconds)
        return 100 * (cpu_seconds(self.pid) - before) / (time.monotonic() - t0)

    def stop(self) -> None:
        subprocess.run([*TMUX, "kill-session", "-t", self.session], capture_output=True)

    def _tmux(self, *args: str) -> str:
        return subprocess.run([*TMUX, *args], capture_output=True, text=True,
                              check=True).stdout


def import_seconds() -> float:
    """Python start plus importing the console (Textual, aiohttp): the floor of any paint."""
    runs = []
    for _ in range(3):
        started = time.monotonic()
        subprocess.run([sys.executable, "-c", "import gpumesh.tui.app"], check=True,
                       cwd=tempfile.gettempdir())
        runs.append(time.monotonic() - started)
    return statistics.median(runs)


def main() -> None:
    subprocess.run([*TMUX, "new-session", "-d", "-s", "keeper", "sleep 86400"], check=True)
    sim = SimCluster(NODES, GPUS, live=True, history=300, models=6).start()
    print(f"simulated cluster: {NODES} nodes × {GPUS} GPUs = {NODES * GPUS} GPUs, "
          f"telemetry at 1 Hz, 300 s of history on attach; load avg {os.getloadavg()[0]:.1f}")
    try:
        print(f"python start + imports alone: median {import_seconds():.2f} s")
        for size in SIZES:
            starts = []
            for _ in range(STARTS):
                console = Console(sim.url, size)
                try:
                    starts.append(console.start())
                finally:
                    console.stop()
            print(f"{size[0]}×{size[1]}  first full paint: median {statistics.median(starts):.2f} s "
                  f"(min {min(starts):.2f}, max {max(starts):.2f}, {STARTS} starts)")
        for size in SIZES:
            console = Console(sim.url, size)
            try:
                console.start()
                for view, key in (("cluster", "1"), ("gpus", "2")):
                    console.keys(key)
                    time.sleep(3)                      # the switch and the first redraws
                    percent = console.cpu_percent(CPU_WINDOW_S)
                    print(f"{size[0]}×{size[1]}  {view:8s} view, 1 Hz: {percent:4.1f} % of a core "
                          f"over {CPU_WINDOW_S:.0f} s, RSS {rss_mib(console.pid):.0f} MiB")
            finally:
                console.stop()
    finally:
        sim.stop()
        subprocess.run([*TMUX, "kill-server"], capture_output=True)
    print("reference (CONSOLE-NOTES, a Textual prototype, 128 GPU rows + 4 braille charts at "
          "1 Hz): 2.2–2.4 % at 80×24, 5.0 % at 200×50, 43–51 MB RSS. nvitop needs an NVIDIA "
          "driver (NVML) to run at all, which this machine has not.")


if __name__ == "__main__":
    main()
