"""Run a real daemon on a GPU machine and print what it sees and decides.

For the lent GPU machine: the node's inventory from the NVIDIA probe, what each engine
installed there can use, where the scheduler puts a tiny GGUF model, and the memory and a
chat round trip. Prints figures and facts; passes or fails nothing.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from harness import Daemon, children_of, rss_kib  # noqa: E402
from tinymodels import write_tiny_gguf  # noqa: E402


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        daemon = Daemon(work / "data")
        started = time.perf_counter()
        daemon.start(timeout=120)
        print(f"daemon healthy after {time.perf_counter() - started:.2f} s")
        try:
            banner = [line for line in daemon.output().splitlines()
                      if line.startswith(("gpumesh", "  ")) or "probe" in line]
            print("\n".join(banner))
            node = daemon.api("/api/nodes")[1]["data"][0]
            for gpu in node["inventory"]["gpus"]:
                print(f"GPU {gpu['index']}: {gpu['name']} {gpu['memory_total_bytes'] >> 20} MiB "
                      f"used {gpu['memory_used_bytes'] >> 20} MiB {gpu['temperature_c']} C "
                      f"{gpu['power_w']} W")
            print("node backends:", json.dumps(node["backends"]))

            model = write_tiny_gguf(work / "tiny.gguf")
            result = daemon.cli("deploy", str(model), "--name", "tiny", "--wait")
            print("deploy:", result.returncode, result.stdout.strip(), result.stderr.strip())
            instance = daemon.wait_model("tiny")["instances"][0]
            print("placement:", json.dumps(instance["allocation"]))

            body = json.dumps({"model": "tiny", "max_tokens": 8,
                               "messages": [{"role": "user", "content": "hi"}],
                               "grammar": 'root ::= "hello there"'}).encode()
            request = urllib.request.Request(
                daemon.url + "/v1/chat/completions", data=body,
                headers={"Authorization": f"Bearer {daemon.admin_key}",
                         "Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=30) as response:
                reply = json.loads(response.read())
            print("chat:", repr(reply["choices"][0]["message"]["content"]), reply["usage"])
            assert daemon.process is not None
            engine = children_of(daemon.process.pid)[0]
            print(f"daemon RSS {rss_kib(daemon.process.pid) / 1024:.1f} MiB, "
                  f"engine RSS {rss_kib(engine) / 1024:.1f} MiB")
        finally:
            print("stop exit status:", daemon.stop())


if __name__ == "__main__":
    main()
