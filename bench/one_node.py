"""One node's figures: start-up, deploy-to-running, idle memory and CPU, gateway overhead.

Prints numbers; passes or fails nothing. Run: `.venv/bin/python bench/one_node.py`.
Everything runs on loopback with kernel-chosen ports and a temporary data dir; every loop
is bounded in count.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from harness import Daemon, children_of, rss_kib  # noqa: E402
from tinymodels import write_tiny_gguf  # noqa: E402

REQUESTS = 200          # sequential chat requests per path
IDLE_SECONDS = 10.0     # window for the idle CPU figure


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def chat_latencies(url: str, key: str | None, count: int) -> list[float]:
    body = json.dumps({"model": "tiny", "max_tokens": 4,
                       "messages": [{"role": "user", "content": "hi"}]}).encode()
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    timings = []
    for _ in range(count):
        request = urllib.request.Request(url + "/v1/chat/completions", data=body,
                                         headers=headers)
        start = time.perf_counter()
        with urllib.request.urlopen(request, timeout=30) as response:
            response.read()
        timings.append((time.perf_counter() - start) * 1000)
    return timings


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = write_tiny_gguf(work / "tiny.gguf")
        daemon = Daemon(work / "data")
        started = time.perf_counter()
        daemon.start()
        startup_s = time.perf_counter() - started
        try:
            started = time.perf_counter()
            result = daemon.cli("deploy", str(model), "--name", "tiny", "--wait")
            deploy_s = time.perf_counter() - started
            assert result.returncode == 0, result.stderr
            instance = daemon.wait_model("tiny")["instances"][0]
            assert daemon.process is not None
            pid = daemon.process.pid
            engine_pid = children_of(pid)[0]

            time.sleep(2.0)                               # let start-up work settle
            cpu_before = cpu_seconds(pid)
            time.sleep(IDLE_SECONDS)
            idle_cpu = (cpu_seconds(pid) - cpu_before) / IDLE_SECONDS * 100
            daemon_rss, engine_rss = rss_kib(pid), rss_kib(engine_pid)

            direct = chat_latencies(f"http://127.0.0.1:{instance['port']}", None, REQUESTS)
            gateway = chat_latencies(daemon.url, daemon.admin_key, REQUESTS)
        finally:
            daemon.stop()

    p50_direct, p50_gateway = statistics.median(direct), statistics.median(gateway)
    print(f"daemon start to healthy API:          {startup_s:6.2f} s")
    print(f"deploy --wait (tiny GGUF, llama.cpp): {deploy_s:6.2f} s")
    print(f"daemon RSS, idle, one model running:  {daemon_rss / 1024:6.1f} MiB")
    print(f"engine RSS (llama.cpp, tiny model):   {engine_rss / 1024:6.1f} MiB")
    print(f"daemon CPU, idle ({IDLE_SECONDS:.0f} s window):      {idle_cpu:6.2f} % of a core")
    print(f"chat p50, engine directly ({REQUESTS} req):  {p50_direct:6.2f} ms")
    print(f"chat p50, through the gateway:        {p50_gateway:6.2f} ms "
          f"(+{p50_gateway - p50_direct:.2f} ms)")


if __name__ == "__main__":
    main()
