"""Run real `gpumesh up` daemons as subprocesses for end-to-end tests.

Everything stays on loopback with ports the kernel hands out, and every process a test
starts is stopped by the test (the fixture's finaliser kills what is left).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def children_of(pid: int) -> list[int]:
    """Direct child process ids of `pid`, read from /proc (Linux)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name is in parentheses and may hold spaces: split after the last ')'.
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid:
            found.append(int(entry.name))
    return found


def pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


class Daemon:
    """One `gpumesh up` process with its own data dir and ports."""

    def __init__(self, data_dir: Path, *extra_args: str) -> None:
        self.data_dir = data_dir
        self.api_port = free_port()
        self.raft_port = free_port()
        self.extra_args = extra_args
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = data_dir.parent / f"{data_dir.name}-daemon.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def start(self, timeout: float = 30.0) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gpumesh", "up", "--data-dir", str(self.data_dir),
             "--api-port", str(self.api_port), "--raft-port", str(self.raft_port),
             *self.extra_args],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            # Outside the checkout, as a user's shell would be: in the repo root the
            # source folder `gpumesh/` would shadow the installed package.
            cwd=self.data_dir.parent, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"gpumesh up exited with {self.process.returncode}:\n"
                                   f"{self.output()}")
            if self._healthy():
                return
            time.sleep(0.1)
        raise TimeoutError(f"gpumesh up not healthy after {timeout} s:\n{self.output()}")

    def stop(self, sig: int = signal.SIGINT, timeout: float = 30.0) -> int:
        """Send `sig` (Ctrl-C by default) and wait for the exit status."""
        assert self.process is not None
        self.process.send_signal(sig)
        return self.process.wait(timeout)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def output(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    @property
    def admin_key(self) -> str:
        return (self.data_dir / "admin.key").read_text().strip()

    def cli(self, *args: str, timeout: float = 120.0,
            cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        """Run `gpumesh ARGS` against this daemon the way a user's shell would."""
        env = {**os.environ, "GPUMESH_URL": self.url, "GPUMESH_API_KEY": self.admin_key}
        return subprocess.run([sys.executable, "-m", "gpumesh", *args], env=env,
                              cwd=cwd or self.data_dir.parent, capture_output=True, text=True,
                              timeout=timeout)

    def api(self, path: str, key: str | None = "admin") -> tuple[int, Any]:
        request = urllib.request.Request(self.url + path)
        if key is not None:
            token = self.admin_key if key == "admin" else key
            request.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def wait_model(self, name: str, status: str = "running", timeout: float = 60.0) -> dict:
        deadline = time.monotonic() + timeout
        model: dict = {}
        while time.monotonic() < deadline:
            code, model = self.api(f"/api/models/{name}")
            if code == 200 and model["status"] == status:
                return model
            time.sleep(0.1)
        raise TimeoutError(f"{name} not {status} after {timeout} s: {model}\n{self.output()}")

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/api/health", timeout=1) as response:
                return response.status == 200
        except OSError:
            return False
