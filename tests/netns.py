"""Network namespaces joined by a bridge, for real mDNS and real partitions (root only).

Layout, every name unique per test run (others run the same kind of tests at once):

    root ns: veth gmr<id> 10.A.B.254/24 ── hub ns gmh<id>: bridge br0 ── p1 … pN
                                                                        │
                                          node ns gmn<id>-<i>: eth0 10.A.B.i/24, lo

The addresses exist only on these veths; mDNS stays on the bridge (a multicast route per
namespace, snooping off); the root-side veth lets the test reach every node's API. Taking
a node's bridge port down is a real partition. `close()` deletes all of it.
"""

from __future__ import annotations

import ipaddress
import json
import os
import random
import secrets
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from harness import Daemon

__all__ = ["Topology", "NetnsDaemon", "unusable_reason"]


def unusable_reason() -> str | None:
    """Why these tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "the `ip` tool (iproute2) is not installed"
    return None


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


class Topology:
    def __init__(self, size: int) -> None:
        self.id = secrets.token_hex(3)
        self.hub = f"gmh{self.id}"
        self.root_veth = f"gmr{self.id}"
        self.subnet = _free_subnet()
        self.namespaces = [f"gmn{self.id}-{i}" for i in range(1, size + 1)]
        self._made: list[str] = []

    def address(self, index: int) -> str:
        """Node `index` (1-based) address."""
        return str(self.subnet.network_address + index)

    def open(self) -> None:
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def _build(self) -> None:
        _ip("netns", "add", self.hub)
        self._made.append(self.hub)
        _ip("-n", self.hub, "link", "add", "br0", "type", "bridge", "mcast_snooping", "0")
        _ip("-n", self.hub, "link", "set", "br0", "up")
        _ip("link", "add", self.root_veth, "type", "veth", "peer", "name", "up0",
            "netns", self.hub)
        _ip("-n", self.hub, "link", "set", "up0", "master", "br0", "up")
        _ip("addr", "add", f"{self.subnet.network_address + 254}/24", "dev", self.root_veth)
        _ip("link", "set", self.root_veth, "up")
        for index, ns in enumerate(self.namespaces, start=1):
            _ip("netns", "add", ns)
            self._made.append(ns)
            _ip("-n", self.hub, "link", "add", f"p{index}", "type", "veth", "peer", "name",
                "eth0", "netns", ns)
            _ip("-n", self.hub, "link", "set", f"p{index}", "master", "br0", "up")
            _ip("-n", ns, "addr", "add", f"{self.address(index)}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")         # engines listen on loopback
            _ip("-n", ns, "route", "add", "224.0.0.0/4", "dev", "eth0")

    def partition(self, index: int, connected: bool) -> None:
        """Cut node `index` off the bridge (or put it back): no FIN, no RST, just silence."""
        _ip("-n", self.hub, "link", "set", f"p{index}", "up" if connected else "down")

    def close(self) -> None:
        subprocess.run(["ip", "link", "del", self.root_veth], capture_output=True, timeout=30)
        for ns in reversed(self._made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        self._made.clear()


class NetnsDaemon(Daemon):
    """A daemon inside node namespace `index`, on that namespace's address, default ports."""

    fresh_ports_on_conflict = False      # each namespace's ports are its own

    def __init__(self, topology: Topology, index: int, data_dir: Path, *extra: str) -> None:
        super().__init__(data_dir, "--host", topology.address(index), "--node-name",
                         f"ns{index}", *extra)
        self.prefix = ("ip", "netns", "exec", topology.namespaces[index - 1])
        self.host = topology.address(index)
        self.api_port, self.raft_port = 8470, 8471     # each namespace has its own ports

    def request(self, method: str, path: str, body: Any = None,
                timeout: float = 30.0, key: str | None = "admin") -> tuple[int, Any]:
        """From inside the node's namespace: it answers even while partitioned."""
        token = self.admin_key if key == "admin" else key
        script = ("import json, sys; from harness import http_json; "
                  "print(json.dumps(http_json(*json.loads(sys.argv[1]))))")
        done = subprocess.run(
            [*self.prefix, sys.executable, "-c", script,
             json.dumps([self.url + path, method, body, token, timeout])],
            capture_output=True, text=True, timeout=timeout + 30,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).parent)})
        if done.returncode != 0:
            return 0, done.stderr
        status, answer = json.loads(done.stdout)
        return status, answer


def _free_subnet() -> ipaddress.IPv4Network:
    """A 10.x.y.0/24 that no route on this machine uses."""
    routes = subprocess.run(["ip", "-4", "route", "show", "table", "all"], capture_output=True,
                            text=True, timeout=30).stdout
    used = [ipaddress.ip_network(word, strict=False) for line in routes.splitlines()
            for word in line.split()[:1] if "/" in word or word[0].isdigit()
            if _is_network(word)]
    for _ in range(100):
        subnet = ipaddress.ip_network(f"10.{random.randint(100, 250)}.{random.randint(0, 255)}"
                                      f".0/24")
        if not any(subnet.overlaps(u) for u in used):
            return subnet
    raise RuntimeError("no free 10.x.y.0/24 subnet for the test network")


def _is_network(word: str) -> bool:
    try:
        ipaddress.ip_network(word, strict=False)
    except ValueError:
        return False
    return True
