"""Instances that stay healthy, their logs, and engine versions side by side — with real
daemons and real llama.cpp engines (the xllamacpp runner).

One daemon probes its engines every 0.3 s and calls 2 s of health "a healthy run", so a
wedged engine is caught in about a second and the backoff reset can be seen in a test.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import urllib.request
from pathlib import Path

import openai
import pytest

from harness import Daemon, children_of, pid_alive
from tinymodels import write_tiny_gguf

GRAMMAR = 'root ::= "hello there"'
CHAT = [{"role": "user", "content": "Say hello."}]
# Two xllamacpp releases from PyPI, neither of them the one gpumesh itself depends on.
OLD, OLDER = "2026.9.11063", "2026.8.10566"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("lifecycle")


@pytest.fixture(scope="module")
def tiny_model(workdir: Path) -> Path:
    return write_tiny_gguf(workdir / "tiny.gguf")


@pytest.fixture(scope="module")
def node(workdir: Path, tiny_model: Path):
    daemon = Daemon(workdir / "data", "--engine-health-interval", "0.3",
                    "--engine-healthy-uptime", "2")
    daemon.start()
    deployed = daemon.cli("deploy", str(tiny_model), "--name", "tiny", "--wait", "--timeout", "60")
    assert deployed.returncode == 0, deployed.stderr
    yield daemon
    daemon.kill()


def chat(node: Daemon, model: str = "tiny") -> str:
    client = openai.OpenAI(base_url=node.url + "/v1", api_key=node.admin_key, max_retries=0,
                           timeout=30)
    reply = client.chat.completions.create(model=model, messages=CHAT, max_tokens=16,
                                           extra_body={"grammar": GRAMMAR})
    return reply.choices[0].message.content or ""


def engine_of(instance: dict) -> int:
    """The engine process itself: the only child of the instance's guard."""
    children = children_of(instance["pid"])
    assert len(children) == 1, children
    return children[0]


def wait_instance(node: Daemon, predicate, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    instance: dict = {}
    while time.monotonic() < deadline:
        instance = node.api("/api/models/tiny")[1]["instances"][0]
        if predicate(instance):
            return instance
        time.sleep(0.05)
    raise AssertionError(f"instance never got there: {instance}\n{node.output()[-2000:]}")


def test_a_stopped_engine_is_restarted_and_a_healthy_run_resets_the_backoff(node: Daemon) -> None:
    before = wait_instance(node, lambda i: i["state"] == "running")
    engine = engine_of(before)
    os.kill(engine, signal.SIGSTOP)          # alive, port open, answering nothing
    try:
        restarted = wait_instance(node, lambda i: i["pid"] != before["pid"]
                                  and i["state"] == "running")
    finally:
        if pid_alive(engine):
            os.kill(engine, signal.SIGCONT)
    assert not pid_alive(engine)             # killed, not left stopped
    assert restarted["restarts"] == 1
    assert "stopped answering its health check" in node.output()
    assert chat(node) == "hello there"

    # Healthy for longer than --engine-healthy-uptime (2 s): the next failure counts as the
    # first again (1 s backoff), not the second (2 s).
    time.sleep(2.5)
    os.kill(engine_of(restarted), signal.SIGKILL)
    again = wait_instance(node, lambda i: i["pid"] != restarted["pid"] and i["state"] == "running")
    assert again["restarts"] == 1
    assert chat(node) == "hello there"


def test_logs_are_served_tailed_and_followed_from_the_api_and_the_cli(node: Daemon) -> None:
    instance = wait_instance(node, lambda i: i["state"] == "running")
    whole = node.cli("logs", "tiny")
    assert whole.returncode == 0, whole.stderr
    assert "llama.cpp runner: serving" in whole.stdout
    assert "gpumesh guard: starting: " in whole.stdout
    last = node.cli("logs", instance["id"], "--tail", "1")
    assert last.stdout.count("\n") == 1

    request = urllib.request.Request(
        f"{node.url}/api/instances/{instance['id']}/logs?tail=0&follow=1",
        headers={"Authorization": f"Bearer {node.admin_key}"})
    with urllib.request.urlopen(request, timeout=30) as stream:
        assert chat(node) == "hello there"   # the engine logs the request …
        arrived = stream.read1(65536)        # … and the open stream passes it on
    assert arrived.strip()

    assert node.api("/api/instances/nope/logs")[0] == 404
    assert node.api(f"/api/instances/{instance['id']}/logs?tail=-1")[0] == 400


def test_a_bad_engine_argument_shows_the_engines_own_error_line(node: Daemon,
                                                                 tiny_model: Path) -> None:
    deployed = node.cli("deploy", str(tiny_model), "--name", "bad-arg", "--arg=--bogus-flag",
                        "--wait", "--timeout", "30")
    assert deployed.returncode != 0
    model = node.api("/api/models/bad-arg")[1]
    reason = model["instances"][0]["reason"]
    assert "error: unrecognized arguments: --bogus-flag" in reason, reason
    assert "usage:" not in reason
    assert node.cli("rm", "bad-arg").returncode == 0


def test_embedding_and_rerank_kinds_are_detected_and_served(node: Daemon,
                                                            workdir: Path) -> None:
    """A GGUF that declares mean pooling is an embedding model and one with rank pooling a
    reranker: detected at deploy, started with --embeddings / --reranking, and answered
    through the gateway on their own routes only."""
    embedder = write_tiny_gguf(workdir / "embed" / "e.gguf", pooling="mean")
    reranker = write_tiny_gguf(workdir / "rerank" / "r.gguf", pooling="rank")
    for path, name in ((embedder, "embed"), (reranker, "rank")):
        done = node.cli("deploy", str(path), "--name", name, "--wait", "--timeout", "60")
        assert done.returncode == 0, done.stderr
    assert node.api("/api/models/embed")[1]["kind"] == "embedding"
    assert node.api("/api/models/rank")[1]["kind"] == "rerank"

    client = openai.OpenAI(base_url=node.url + "/v1", api_key=node.admin_key, max_retries=0,
                           timeout=30)
    vectors = client.embeddings.create(model="embed", input=["hello world", "abc"])
    assert [len(v.embedding) for v in vectors.data] == [64, 64]
    with pytest.raises(openai.BadRequestError):           # an embedding model does not chat
        client.chat.completions.create(model="embed", messages=CHAT, max_tokens=4)

    request = urllib.request.Request(
        node.url + "/v1/rerank", method="POST",
        data=json.dumps({"model": "rank", "query": "hello",
                         "documents": ["hello world", "abc", "xyz"]}).encode(),
        headers={"Authorization": f"Bearer {node.admin_key}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as reply:
        ranked = json.loads(reply.read())
    assert sorted(r["index"] for r in ranked["results"]) == [0, 1, 2]
    for name in ("embed", "rank"):
        assert node.cli("rm", name).returncode == 0


def test_removing_a_model_removes_its_logs(node: Daemon, tiny_model: Path) -> None:
    logs = node.data_dir / "logs"
    instance = wait_instance(node, lambda i: i["state"] == "running")
    assert list(logs.glob(f"{instance['id']}.log*"))
    assert node.cli("rm", "tiny").returncode == 0
    deadline = time.monotonic() + 15
    while list(logs.glob(f"{instance['id']}.log*")) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not list(logs.glob(f"{instance['id']}.log*"))


def test_two_xllamacpp_versions_installed_on_demand_serve_at_once(
        workdir: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A backends dir of its own, so the daemon really installs both (uv's cache keeps that
    # to seconds after the first run on a machine).
    monkeypatch.setenv("GPUMESH_BACKENDS_DIR", str(workdir / "backends"))
    daemon = Daemon(workdir / "versions-data")
    daemon.start()
    try:
        for name, version in (("old", OLD), ("older", OLDER)):
            done = daemon.cli("deploy", str(tiny_model), "--name", name,
                              "--backend", f"llama.cpp=={version}", "--wait", "--timeout", "300",
                              timeout=330)
            assert done.returncode == 0, done.stderr + daemon.output()[-2000:]
        models = {m["name"]: m for m in daemon.api("/api/models")[1]["data"]}
        for name, version in (("old", OLD), ("older", OLDER)):
            instance = models[name]["instances"][0]
            assert instance["state"] == "running"
            assert instance["engine"]["version"] == version
            engine = children_of(instance["pid"])[0]
            argv = Path(f"/proc/{engine}/cmdline").read_bytes().split(b"\0")
            assert argv[0].decode() == str(workdir / "backends" / "llama.cpp" / version / "bin" / "python")
            assert chat(daemon, name) == "hello there"     # both answer, side by side

        node_record = daemon.api("/api/nodes")[1]["data"][0]
        assert node_record["backends"]["llama.cpp"]["versions"] == [OLDER, OLD]
        listing = daemon.cli("backends", "--json")
        rows = json.loads(listing.stdout)
        assert [r["versions"] for r in rows if r["engine"] == "llama.cpp"] == [[OLDER, OLD]]
        assert "installed llama.cpp" in daemon.output()
    finally:
        daemon.kill()
