"""One model spread over nodes with llama.cpp's RPC, for real: three `gpumesh up` daemons on
loopback, each offering less RAM than the model needs (`--memory-limit-mib`), so the
scheduler splits it over two of them; the worker's agent starts a real `rpc-server`, the
head a real `llama-server --rpc`, and the third node, which holds none of it, answers a
chat through its gateway. A crashed rpc-server comes back and the head restarts with it;
then the worker daemon is killed -9 and the model is planned again on the two nodes left.

It needs llama.cpp built with GGML_RPC (`bench/build_llama_rpc.sh`, ~15-25 min here): the
binaries are found through GPUMESH_LLAMA_SERVER / GPUMESH_LLAMA_RPC_SERVER or in
~/.cache/gpumesh-tests/llama.cpp-rpc/bin; without them the test skips. Memory figures are
printed (run with -s) and held to the plan loosely: resident memory is the kernel's count of
touched pages, not the allocator's.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from harness import Cluster, Daemon, children_of, free_port, http_json, pid_alive
from tinymodels import write_tiny_gguf

from gpumesh.mesh.scheduler import Requirement
from gpumesh.modelfiles import estimate_memory

pytestmark = pytest.mark.slow

MiB = 1 << 20
BUILD_DIR = Path(os.environ.get("GPUMESH_LLAMA_RPC_DIR",
                                Path.home() / ".cache" / "gpumesh-tests" / "llama.cpp-rpc"))
GRAMMAR = 'root ::= "hello there"'
# Each node offers this share of what the model needs on one node: none holds it alone,
# any two do (the split part divides; each node also holds the engine's fixed part).
NODE_SHARE = 0.65


def _binaries() -> tuple[str, str]:
    server = os.environ.get("GPUMESH_LLAMA_SERVER") or str(BUILD_DIR / "bin" / "llama-server")
    rpc = os.environ.get("GPUMESH_LLAMA_RPC_SERVER") or str(BUILD_DIR / "bin" / "rpc-server")
    for path in (server, rpc):
        if not os.access(path, os.X_OK):
            pytest.skip(f"no llama.cpp build with RPC at {path}: run bench/build_llama_rpc.sh "
                        "(or set GPUMESH_LLAMA_SERVER and GPUMESH_LLAMA_RPC_SERVER)")
    return server, rpc


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("rpc-real")


@pytest.fixture(scope="module")
def binaries() -> tuple[str, str]:
    """Asked first, so that without a build the tests skip before writing the 216 MB model."""
    return _binaries()


@pytest.fixture(scope="module")
def model(workdir: Path, binaries: tuple[str, str]) -> Path:
    # 16 layers of 512 wide, all F32: ~216 MB, so a share of it is plain in any RSS figure.
    return write_tiny_gguf(workdir / "wide.gguf", n_layer=16, n_embd=512, n_head=8,
                           n_head_kv=8, n_ff=1536, context_length=512)


@pytest.fixture(scope="module")
def cluster(workdir: Path, model: Path, binaries: tuple[str, str]) -> Iterator[Cluster]:
    server, rpc = binaries
    need = Requirement.of({"name": "wide", "backend": "llama.cpp",
                           "estimate": estimate_memory(model).to_dict()}).need("cpu")
    limit_mib = math.ceil(need * NODE_SHARE / MiB)
    cluster = Cluster(workdir, 3, "--memory-limit-mib", str(limit_mib),
                      "--reserved-memory-mib", "0")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("GPUMESH_LLAMA_SERVER", server)
        env.setenv("GPUMESH_LLAMA_RPC_SERVER", rpc)
        try:
            cluster.start()
            yield cluster
        finally:
            cluster.kill_all()


def node_id(node: Daemon) -> str:
    return json.loads((node.data_dir / "node.json").read_text())["id"]


def chat(node: Daemon, timeout: float = 60.0) -> tuple[int, str]:
    body = {"model": "wide", "max_tokens": 16, "grammar": GRAMMAR,
            "messages": [{"role": "user", "content": "Say hello."}]}
    status, answer = node.request("POST", "/v1/chat/completions", body, timeout=timeout)
    if status == 200:
        return status, answer["choices"][0]["message"]["content"]
    return status, str(answer)


def running_instance(node: Daemon) -> dict[str, Any] | None:
    code, body = node.api("/api/instances")
    assert code == 200, body
    found = [i for i in body["data"] if i["model"] == "wide" and i["state"] == "running"]
    return found[0] if found else None


def descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        for child in children_of(todo.pop()):
            found.append(child)
            todo.append(child)
    return found


def processes_named(root: int, name: str) -> list[int]:
    """Processes under `root` whose program is `name` (not the guard that runs them)."""
    found = []
    for pid in descendants(root):
        try:
            argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
        except OSError:
            continue
        if Path(argv0).name == name:
            found.append(pid)
    return found


def process_named(root: int, name: str) -> int:
    found = processes_named(root, name)
    assert len(found) == 1, f"{len(found)} {name} processes under {root}"
    return found[0]


def greedy(url: str, key: str | None = None) -> str:
    body = {"model": "wide", "max_tokens": 12, "temperature": 0,
            "messages": [{"role": "user", "content": "hello world"}]}
    status, answer = http_json(url + "/v1/chat/completions", "POST", body, key, 60)
    assert status == 200, answer
    return answer["choices"][0]["message"]["content"]


def solo_answer(model: Path) -> str:
    """The same model in one llama-server of the same build, on its own (the reference)."""
    port = free_port()
    process = subprocess.Popen([_binaries()[0], "-m", str(model), "--host", "127.0.0.1",
                                "--port", str(port), "-c", "512", "-ngl", "0", "--alias", "wide"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if http_json(f"http://127.0.0.1:{port}/health", "GET", None, None, 2)[0] == 200:
                return greedy(f"http://127.0.0.1:{port}")
            time.sleep(0.2)
        raise TimeoutError("the reference llama-server did not start")
    finally:
        process.kill()
        process.wait(10)


def rss_parts_mib(pid: int) -> dict[str, float]:
    """Resident memory split the kernel's way: anonymous (what the process allocated) and
    file-backed (mapped model file pages)."""
    status = Path(f"/proc/{pid}/status").read_text()
    parts = dict(re.findall(r"^(Rss\w+|VmRSS):\s+(\d+) kB", status, re.MULTILINE))
    return {k: int(v) / 1024 for k, v in parts.items()}


@pytest.fixture(scope="module")
def reference(cluster: Cluster, model: Path) -> str:
    return solo_answer(model)


def test_a_model_too_big_for_any_node_is_spread_over_two_and_served_by_the_third(
        cluster: Cluster, model: Path, reference: str) -> None:
    front = cluster.nodes[0]
    dry = front.cli("deploy", str(model), "--name", "wide", "--dry-run")
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert "split over two nodes with llama.cpp RPC servers" in dry.stdout, dry.stdout
    assert "of RAM: the most free is" in dry.stdout          # why one node is not enough

    started = time.monotonic()
    deployed = front.cli("deploy", str(model), "--name", "wide", "--wait", "--timeout", "240",
                         timeout=300)
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr + front.output()[-3000:]
    ready_s = time.monotonic() - started
    instance = running_instance(front)
    assert instance is not None
    allocation = instance["allocation"]
    assert allocation["mechanism"] == "llama.cpp-rpc" and allocation["device"] == "cpu"
    worker_id = allocation["workers"][0]["node_id"]
    by_id = {node_id(n): n for n in cluster.nodes}
    head, worker = by_id[instance["node_id"]], by_id[worker_id]
    bystander = next(n for n in cluster.nodes if n not in (head, worker))
    assert instance["rpc_endpoints"][worker_id].startswith("127.0.0.1:")

    listed = bystander.cli("instances")
    assert listed.returncode == 0 and "cpu +1 node(s)" in listed.stdout, listed.stdout
    assert "split over two nodes" in listed.stdout

    assert chat(bystander) == (200, "hello there")   # through a node that holds none of it
    # The spread model computes what the whole model does in one llama-server (greedy
    # tokens of random weights: any layer missing or misplaced changes them).
    assert greedy(bystander.url, bystander.admin_key) == reference

    # Each process holds about its share of the plan.
    rpc_pid = process_named(worker.process.pid, "rpc-server")      # type: ignore[union-attr]
    head_pid = process_named(head.process.pid, "llama-server")     # type: ignore[union-attr]
    bookings = {b["node_id"]: b["memory_bytes"] / MiB for b in allocation["bookings"]}
    shares = dict(zip((b["node_id"] for b in allocation["bookings"]),
                      (s / MiB for s in allocation["split_bytes"])))
    figures = {"ready_s": round(ready_s, 1), "model_mib": round(model.stat().st_size / MiB, 1),
               "worker": {"booked_mib": round(bookings[worker_id], 1),
                          "split_mib": round(shares[worker_id], 1),
                          "rss_mib": rss_parts_mib(rpc_pid)},
               "head": {"booked_mib": round(bookings[instance["node_id"]], 1),
                        "split_mib": round(shares[instance["node_id"]], 1),
                        "rss_mib": rss_parts_mib(head_pid)}}
    print("\nRPC split:", json.dumps(figures, indent=1))
    # Anonymous memory on the worker (the layers it was sent) and all resident memory on
    # the head (its layers, mapped from the file): at least 3/4 of the plan's share, and
    # within the booking plus a quarter.
    for role, resident in (("worker", figures["worker"]["rss_mib"]["RssAnon"]),
                           ("head", figures["head"]["rss_mib"]["VmRSS"])):
        share, booked = figures[role]["split_mib"], figures[role]["booked_mib"]
        assert 0.75 * share <= resident <= 1.25 * booked, (role, figures)


def test_a_crashed_rpc_server_comes_back_and_the_head_restarts_with_it(
        cluster: Cluster, reference: str) -> None:
    """llama-server cannot reconnect to a new rpc-server: the head restarts when a worker's
    endpoint changes, on the same plan (the worker node is still there)."""
    front = cluster.nodes[0]
    before = running_instance(front)
    assert before is not None, "the first test deployed nothing"
    worker_id = before["allocation"]["workers"][0]["node_id"]
    worker = next(n for n in cluster.nodes if node_id(n) == worker_id)
    os.kill(process_named(worker.process.pid, "rpc-server"), signal.SIGKILL)  # type: ignore[union-attr]

    def back() -> bool:
        now = running_instance(front)
        return (now is not None and now["id"] == before["id"] and now["pid"] != before["pid"]
                and now["rpc_endpoints"].get(worker_id) not in (None, before["rpc_endpoints"][worker_id]))
    cluster.wait(back, "a new rpc-server on the worker and a new llama-server on the head", 60)
    assert greedy(front.url, front.admin_key) == reference


def test_a_killed_worker_daemon_gets_the_model_planned_again(cluster: Cluster,
                                                            reference: str) -> None:
    front = cluster.nodes[0]
    before = running_instance(front)
    assert before is not None, "the first test deployed nothing"
    worker_id = before["allocation"]["workers"][0]["node_id"]
    worker = next(n for n in cluster.nodes if node_id(n) == worker_id)
    rpc_pid = process_named(worker.process.pid, "rpc-server")      # type: ignore[union-attr]
    killed_at = time.monotonic()
    worker.process.send_signal(signal.SIGKILL)                    # type: ignore[union-attr]
    worker.process.wait(10)                                       # type: ignore[union-attr]
    survivors = [n for n in cluster.nodes if n is not worker]
    deadline = time.monotonic() + 10
    while pid_alive(rpc_pid) and time.monotonic() < deadline:     # its rpc-server died with it
        time.sleep(0.1)
    assert not pid_alive(rpc_pid)

    def replanned() -> bool:
        now = running_instance(survivors[0])
        return (now is not None and now["id"] != before["id"] and
                worker_id not in {b["node_id"] for b in now["allocation"]["bookings"]})
    cluster.wait(replanned, "the model planned again on the nodes left", 150)
    recovered_s = time.monotonic() - killed_at
    after = running_instance(survivors[0])
    assert after is not None and after["allocation"]["mechanism"] == "llama.cpp-rpc"
    assert {b["node_id"] for b in after["allocation"]["bookings"]} == \
        {node_id(n) for n in survivors}
    for node in survivors:
        assert chat(node) == (200, "hello there")
        assert greedy(node.url, node.admin_key) == reference        # the new split computes alike
    print(f"\nrecovered {recovered_s:.1f} s after kill -9 of the worker daemon")
    # The old head's llama-server is gone too (its instance was removed with the worker):
    # at most the new plan's head runs there, never two.
    old_head = next(n for n in cluster.nodes if node_id(n) == before["node_id"])
    if old_head.alive:
        assert len(processes_named(old_head.process.pid, "llama-server")) <= 1  # type: ignore[union-attr]
