"""Run real `gpumesh up` daemons as subprocesses for end-to-end tests.

Everything stays on loopback with ports the kernel hands out, and every process a test
starts is stopped by the test (the fixture's finaliser kills what is left).
"""

from __future__ import annotations

import json
import os
import random
import shutil
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


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


_EPHEMERAL_LOW = _ephemeral_low()


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now, for a server the test starts later.

    Chosen below the kernel's ephemeral range where there is room: a port from bind(0) is
    drawn from the range every outgoing connection on the machine also draws from, so
    between this call and the server's bind some client's connection could take it (seen:
    a daemon that could not start). Below the range only another listener can."""
    if _EPHEMERAL_LOW > 12000:
        for _ in range(100):
            port = random.randrange(10000, _EPHEMERAL_LOW)
            with socket.socket() as sock:
                try:
                    sock.bind((host, port))
                except OSError:
                    continue
                return port
    with socket.socket() as sock:
        sock.bind((host, 0))
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


def http_json(url: str, method: str = "GET", body: Any = None, key: str | None = None,
              timeout: float = 30.0) -> tuple[int, Any]:
    """One HTTP call, JSON in and out (text when the answer is not JSON); status 0 when
    nothing answered."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    except OSError as exc:
        return 0, str(exc)
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


class Daemon:
    """One `gpumesh up` process with its own data dir and ports."""

    # A command the daemon runs under, e.g. `ip netns exec NS` (netns.py).
    prefix: tuple[str, ...] = ()
    host = "127.0.0.1"

    def __init__(self, data_dir: Path, *extra_args: str) -> None:
        self.data_dir = data_dir
        self.api_port = free_port()
        self.raft_port = free_port()
        self.extra_args = extra_args
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = data_dir.parent / f"{data_dir.name}-daemon.log"
        self.key: str | None = None      # the cluster's admin key, for nodes that joined
        self._launched_at = 0            # where this launch's output starts in the log
        self._started_once = False

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.api_port}"

    # A first start that finds a port taken picks fresh ones and starts again (free_port
    # can only say a port was free a moment ago). Only the first: after that the ports are
    # the node's identity in its cluster (a restart, a wiped node rejoining in its place).
    fresh_ports_on_conflict = True

    def start(self, timeout: float = 30.0) -> None:
        first = not self._started_once and not self.data_dir.exists()
        for attempt in range(3):
            self.launch()
            try:
                self.wait_healthy(timeout)
                return
            except RuntimeError:
                if not (first and self.fresh_ports_on_conflict and attempt < 2
                        and self._port_was_taken()):
                    raise
            # Nothing of this node reached a cluster: its ports are checked (the API port
            # held) before it joins or founds anything.
            shutil.rmtree(self.data_dir, ignore_errors=True)
            self.api_port, self.raft_port = free_port(), free_port()

    def _port_was_taken(self) -> bool:
        try:
            with open(self.log_path, "rb") as log:
                log.seek(self._launched_at)
                return b"cannot listen on" in log.read()
        except OSError:
            return False

    def launch(self) -> None:
        """Start the process and return at once (a cluster's nodes start together)."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        self._launched_at = log.tell()
        self.process = subprocess.Popen(
            [*self.prefix, sys.executable, "-m", "gpumesh", "up", "--data-dir", str(self.data_dir),
             "--api-port", str(self.api_port), "--raft-port", str(self.raft_port),
             *self.extra_args],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            # Outside the checkout, as a user's shell would be: in the repo root the
            # source folder `gpumesh/` would shadow the installed package.
            cwd=self.data_dir.parent, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        log.close()

    def wait_healthy(self, timeout: float = 30.0) -> None:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"gpumesh up exited with {self.process.returncode}:\n"
                                   f"{self.output()}")
            if self._healthy():
                self._started_once = True
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
        return self.key or (self.data_dir / "admin.key").read_text().strip()

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def request(self, method: str, path: str, body: Any = None,
                timeout: float = 30.0, key: str | None = "admin") -> tuple[int, Any]:
        """Any method, JSON in and out, with the admin key (or `key`, or none)."""
        token = self.admin_key if key == "admin" else key
        return http_json(self.url + path, method, body, token, timeout)

    def cli(self, *args: str, timeout: float = 120.0,
            cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        """Run `gpumesh ARGS` against this daemon the way a user's shell would."""
        env = {**os.environ, "GPUMESH_URL": self.url, "GPUMESH_API_KEY": self.admin_key}
        return subprocess.run([*self.prefix, sys.executable, "-m", "gpumesh", *args], env=env,
                              cwd=cwd or self.data_dir.parent, capture_output=True, text=True,
                              timeout=timeout)

    def api(self, path: str, key: str | None = "admin") -> tuple[int, Any]:
        return self.request("GET", path, key=key, timeout=10)

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


class Cluster:
    """Several daemons on loopback forming one cluster: the first founds it, each next one
    joins with `--join` through the member before it (so joins through followers are
    exercised) and a token minted by the founder."""

    def __init__(self, root: Path, size: int, *extra_args: str) -> None:
        self.root = root
        self.extra_args = extra_args
        self.nodes = [Daemon(root / f"n{i}", "--node-name", f"n{i}", "--discovery", "off",
                             *extra_args) for i in range(size)]

    def start(self, timeout: float = 60.0) -> None:
        founder = self.nodes[0]
        founder.start(timeout)
        for previous, node in zip(self.nodes, self.nodes[1:]):
            self.join(node, through=previous, timeout=timeout)
        self.wait(lambda: all(len(self.status(n)["members"]) == len(self.nodes)
                              for n in self.nodes), "every node sees every member")

    def join(self, node: Daemon, through: Daemon, timeout: float = 60.0) -> None:
        token = self.token(through)
        node.key = self.nodes[0].admin_key
        node.extra_args = (*node.extra_args, "--join", f"{through.host}:{through.api_port}",
                           "--token", token)
        node.start(timeout)
        # Later restarts are plain `gpumesh up`: the data dir knows the cluster.
        node.extra_args = node.extra_args[:-4]

    def token(self, through: Daemon) -> str:
        through.key = self.nodes[0].admin_key
        result = through.cli("join-token", "--ttl", "600")
        assert result.returncode == 0, result.stderr
        return result.stdout.strip()

    def status(self, node: Daemon) -> dict:
        code, body = node.api("/api/status")
        assert code == 200, body
        return body

    def alive(self) -> list[Daemon]:
        return [n for n in self.nodes if n.alive]

    def leader(self, among: list[Daemon] | None = None, timeout: float = 30.0,
               other_than: Daemon | None = None) -> Daemon:
        """The node every live node names as leader (waits for agreement, and for a leader
        other than `other_than` when given)."""
        found: list[Daemon] = []

        def agreed() -> bool:
            nodes = among or self.alive()
            leaders = {self.status(n)["raft"]["leader"] for n in nodes}
            if len(leaders) != 1 or None in leaders:
                return False
            address = leaders.pop()
            found[:] = [n for n in self.nodes if address.endswith(f":{n.raft_port}")
                        and n is not other_than]
            return bool(found)

        self.wait(agreed, "one leader", timeout)
        return found[0]

    def wait(self, predicate: Any, what: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if predicate():
                    return
            except (OSError, AssertionError, KeyError):
                pass
            time.sleep(0.1)
        logs = "\n".join(f"--- {n.data_dir.name}\n{n.output()[-3000:]}" for n in self.nodes)
        raise TimeoutError(f"not after {timeout} s: {what}\n{logs}")

    def kill_all(self) -> None:
        for node in self.nodes:
            node.kill()

    def restart(self, nodes: list[Daemon], timeout: float = 60.0) -> None:
        """Start stopped members together, as plain `gpumesh up`: none can be ready before
        a majority runs."""
        for node in nodes:
            node.launch()
        for node in nodes:
            node.wait_healthy(timeout)
