"""What packaging relies on: a stop that is bounded (systemd's TimeoutStopSec), and a unit
file that systemd itself accepts.

The daemon's stop is: requests in flight get --drain-seconds, engines their grace, then the
store stops. aiohttp alone would wait 60 s for a request that never ends (a stream, a
client that stalls), longer than the unit's stop timeout: the first test holds a request
open for real and times the stop.
"""

from __future__ import annotations

import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from harness import REPO, Daemon

UNIT = REPO / "packaging" / "gpumesh.service"


def test_a_request_in_flight_delays_the_stop_only_for_the_drain(tmp_path: Path) -> None:
    node = Daemon(tmp_path / "data", "--drain-seconds", "1.5")
    node.start()
    try:
        stalled = socket.create_connection(("127.0.0.1", node.api_port), timeout=30)
        # A body announced but never sent: the handler waits for it, in flight, until cut.
        stalled.sendall(b"POST /api/models HTTP/1.1\r\nHost: x\r\nContent-Type: "
                        b"application/json\r\nAuthorization: Bearer " + node.admin_key.encode()
                        + b"\r\nContent-Length: 1000\r\n\r\n{\"name\": ")
        time.sleep(0.5)
        started = time.monotonic()
        assert node.stop(signal.SIGTERM, timeout=60) == 0
        took = time.monotonic() - started
        assert took >= 1.4, f"the request in flight was not waited for ({took:.1f} s)"
        assert took < 30, f"the stop took {took:.1f} s, beyond systemd's budget"
        assert stalled.recv(65536) == b""             # cut, not answered half-way
        assert "stopped" in node.output()
    finally:
        node.kill()


def test_the_units_stop_timeout_covers_the_daemons_stop_budget() -> None:
    text = UNIT.read_text()
    stop_timeout = int(re.search(r"^TimeoutStopSec=(\d+)$", text, re.M).group(1))
    from gpumesh.mesh.config import Config
    from gpumesh.mesh.instance import Timings
    drain = Config.__dataclass_fields__["drain_seconds"].default
    assert stop_timeout >= drain + Timings().stop_grace_s + 10   # + store, membership, probes


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_accepts_the_unit(tmp_path: Path) -> None:
    # verify needs the ExecStart binary to exist: point it at this venv's gpumesh.
    gpumesh = Path(shutil.which("gpumesh") or REPO / ".venv" / "bin" / "gpumesh")
    unit = tmp_path / "gpumesh.service"
    unit.write_text(UNIT.read_text().replace("/opt/gpumesh/venv/bin/gpumesh", str(gpumesh)))
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                            text=True, timeout=60)
    # verify exits 0 even for unknown keys or bad values ("…, ignoring"): read its lines.
    problems = [line for line in result.stderr.splitlines() if str(unit) in line]
    assert result.returncode == 0 and problems == [], result.stderr
