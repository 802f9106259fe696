"""One node, end to end: `gpumesh up`, deploy through the CLI, answer the official OpenAI
client from a real llama.cpp engine, refuse bad input, stop cleanly, restart and serve again.

The tests in this module run in order against one daemon (module-scoped fixture); the last
one restarts it. The model is a random-weight GGUF the test writes itself; a GBNF grammar
pins the engine's output so the answer can be asserted exactly.
"""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest

from harness import Daemon, children_of, free_port, pid_alive
from tinymodels import write_tiny_gguf

GRAMMAR = 'root ::= "hello there"'
CHAT = [{"role": "user", "content": "Say hello."}]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("e2e")


@pytest.fixture(scope="module")
def tiny_model(workdir: Path) -> Path:
    return write_tiny_gguf(workdir / "tiny.gguf")


@pytest.fixture(scope="module")
def daemon(workdir: Path):
    node = Daemon(workdir / "data")
    node.start()
    yield node
    node.kill()


def client(node: Daemon, key: str | None = None) -> openai.OpenAI:
    return openai.OpenAI(base_url=node.url + "/v1", api_key=key or node.admin_key,
                         max_retries=0, timeout=30)


def test_first_start_prints_where_it_listens_and_the_admin_key_once(daemon: Daemon) -> None:
    out = daemon.output()
    assert f"OpenAI API   {daemon.url}/v1" in out
    node_id = json.loads((daemon.data_dir / "node.json").read_text())["id"]
    assert f"· node {node_id} (" in out
    assert daemon.admin_key in out                       # shown once, on first start
    assert stat.S_IMODE(os.stat(daemon.data_dir / "admin.key").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(daemon.data_dir).st_mode) == 0o700
    code, body = daemon.api("/api/status")
    assert code == 200 and body["raft"]["is_leader"] and body["raft"]["has_quorum"]


def test_deploy_wait_then_serve_chat_through_openai_client(daemon: Daemon,
                                                           tiny_model: Path) -> None:
    result = daemon.cli("deploy", str(tiny_model), "--name", "tiny", "--wait", "--timeout", "60")
    assert result.returncode == 0, result.stderr
    assert "tiny is running: 1/1 replica(s) ready" in result.stdout

    api = client(daemon)
    assert "tiny" in [m.id for m in api.models.list().data]

    reply = api.chat.completions.create(model="tiny", messages=CHAT, max_tokens=16,
                                        extra_body={"grammar": GRAMMAR})
    assert reply.choices[0].message.content == "hello there"
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.prompt_tokens > 0 and reply.usage.completion_tokens > 0
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_the_engine_takes_only_its_gateways_key(daemon: Daemon) -> None:
    """The agent starts each engine with a per-instance key derived from the node's own
    secret: on the host, nothing but this node's gateway can call it (issue 17)."""
    code, body = daemon.api("/api/instances")
    port = next(i["port"] for i in body["data"] if i["model"] == "tiny")
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/chat/completions", method="POST",
        data=json.dumps({"model": "tiny", "messages": CHAT, "max_tokens": 4}).encode(),
        headers={"Content-Type": "application/json",
                 "Authorization": f"Bearer {daemon.admin_key}"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=30)
    assert refused.value.code == 401
    log = (daemon.data_dir / "logs").glob("*.log")
    secret = (daemon.data_dir / "engine.secret").read_text().strip()
    assert all(secret not in path.read_text(errors="replace") for path in log)


def test_streamed_chat_arrives_in_order_with_usage(daemon: Daemon) -> None:
    stream = client(daemon).chat.completions.create(
        model="tiny", messages=CHAT, max_tokens=16, stream=True,
        stream_options={"include_usage": True}, extra_body={"grammar": GRAMMAR})
    chunks = list(stream)
    content_chunks = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content_chunks) >= 2                       # it really streamed, piece by piece
    assert "".join(c.choices[0].delta.content for c in content_chunks) == "hello there"
    assert chunks[0].choices[0].delta.role == "assistant"   # the role comes first
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "stop" and all(f is None for f in finishes[:-1])
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    assert len({c.id for c in chunks}) == 1


def test_missing_or_wrong_key_is_401_and_unknown_model_404(daemon: Daemon) -> None:
    code, body = daemon.api("/v1/models", key=None)
    assert code == 401 and body["error"]["code"] == "invalid_api_key"
    assert body["error"]["type"] == "invalid_request_error" and body["error"]["message"]

    with pytest.raises(openai.AuthenticationError) as wrong:
        client(daemon, key="gm-0000-not-a-key").chat.completions.create(
            model="tiny", messages=CHAT)
    assert wrong.value.status_code == 401 and wrong.value.code == "invalid_api_key"

    with pytest.raises(openai.NotFoundError) as missing:
        client(daemon).chat.completions.create(model="no-such-model", messages=CHAT)
    assert missing.value.code == "model_not_found"

    code, body = daemon.api("/api/models", key=None)      # management API too
    assert code == 401 and body["error"]["code"] == "invalid_api_key"


def test_deploy_refusals_say_why_and_lose_nothing(daemon: Daemon, tiny_model: Path,
                                                  workdir: Path) -> None:
    unknown = daemon.cli("deploy", str(tiny_model), "--name", "x", "--backend", "nope")
    assert unknown.returncode == 2 and "unknown backend 'nope'" in unknown.stderr  # invalid input
    assert "llama.cpp" in unknown.stderr                  # it lists what exists

    missing = daemon.cli("deploy", str(workdir / "absent.gguf"), "--name", "x")
    assert missing.returncode == 2 and "does not exist" in missing.stderr

    taken = daemon.cli("deploy", str(tiny_model), "--name", "tiny")
    assert taken.returncode == 1 and "already exists" in taken.stderr

    # A model far larger than this machine: a sparse file, so it costs no disk.
    huge = workdir / "huge.gguf"
    huge.write_bytes(tiny_model.read_bytes())
    os.truncate(huge, 4 << 40)                            # 4 TiB apparent size
    too_big = daemon.cli("deploy", str(huge), "--name", "huge", "--wait", "--timeout", "30")
    assert too_big.returncode == 7                        # not schedulable
    assert re.search(r"cannot run huge: needs 4\.\d TiB of RAM: the most free is [\d.]+ GiB on ",
                     too_big.stderr), too_big.stderr

    removed = daemon.cli("rm", "huge")
    assert removed.returncode == 0
    # Nothing stored before was lost, and it still answers.
    assert daemon.wait_model("tiny")["ready_replicas"] == 1
    reply = client(daemon).chat.completions.create(model="tiny", messages=CHAT, max_tokens=16,
                                                   extra_body={"grammar": GRAMMAR})
    assert reply.choices[0].message.content == "hello there"


def test_a_relative_path_is_the_shells_not_the_daemons(daemon: Daemon, tiny_model: Path,
                                                      workdir: Path) -> None:
    shell_dir = workdir / "elsewhere"
    shell_dir.mkdir()
    (shell_dir / "rel.gguf").write_bytes(tiny_model.read_bytes())
    result = daemon.cli("deploy", "rel.gguf", "--name", "rel", "--wait", cwd=shell_dir)
    assert result.returncode == 0, result.stderr
    assert daemon.wait_model("rel")["source"]["path"] == str(shell_dir / "rel.gguf")
    assert daemon.cli("rm", "rel").returncode == 0


def test_a_second_daemon_on_the_same_data_dir_or_port_is_refused(daemon: Daemon,
                                                                 workdir: Path) -> None:
    def up(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "gpumesh", "up", *args], cwd=workdir,
                              capture_output=True, text=True, timeout=30)

    same_dir = up("--data-dir", str(daemon.data_dir), "--api-port", str(free_port()),
                  "--raft-port", str(free_port()))
    assert same_dir.returncode == 1
    assert f"in use by another gpumesh (pid {daemon.process.pid})" in same_dir.stderr

    same_port = up("--data-dir", str(workdir / "other"), "--api-port", str(daemon.api_port),
                   "--raft-port", str(free_port()))
    assert same_port.returncode == 1
    assert f"cannot listen on 127.0.0.1:{daemon.api_port} (--api-port)" in same_port.stderr

    assert daemon.wait_model("tiny")["ready_replicas"] == 1   # the first one is untouched


def test_scale_up_down_and_503_while_nothing_runs(daemon: Daemon) -> None:
    up = daemon.cli("scale", "tiny", "2", "--wait", "--timeout", "60")
    assert up.returncode == 0, up.stderr
    assert "2/2 replica(s) ready" in up.stdout
    model = daemon.wait_model("tiny")
    assert len({i["port"] for i in model["instances"]}) == 2

    assert daemon.cli("scale", "tiny", "0", "--wait").returncode == 0
    assert daemon.wait_model("tiny", status="stopped")["instances"] == []
    with pytest.raises(openai.InternalServerError) as unavailable:
        client(daemon).chat.completions.create(model="tiny", messages=CHAT)
    assert unavailable.value.status_code == 503
    assert unavailable.value.response.headers["Retry-After"] == "5"
    assert "no running instance" in unavailable.value.message

    bad = daemon.cli("scale", "tiny", "-1")
    assert bad.returncode == 2 and "replicas must be" in bad.stderr
    assert daemon.cli("scale", "tiny", "1", "--wait").returncode == 0


def test_a_crashed_engine_is_restarted_and_serves_again(daemon: Daemon) -> None:
    before = daemon.wait_model("tiny")["instances"][0]
    os.kill(before["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 30
    after = before
    while time.monotonic() < deadline:
        after = daemon.wait_model("tiny")["instances"][0]
        if after["pid"] != before["pid"]:
            break
        time.sleep(0.1)
    assert after["id"] == before["id"] and after["pid"] != before["pid"]
    assert after["restarts"] >= 1 and after["state"] == "running"
    assert "exited with status" in daemon.output()           # the reason was logged
    reply = client(daemon).chat.completions.create(model="tiny", messages=CHAT, max_tokens=16,
                                                   extra_body={"grammar": GRAMMAR})
    assert reply.choices[0].message.content == "hello there"


def test_ctrl_c_stops_every_engine_and_restart_serves_again(daemon: Daemon) -> None:
    assert daemon.process is not None
    engines = children_of(daemon.process.pid)
    assert engines, "the engine should be a child of the daemon"
    old_pid = daemon.wait_model("tiny")["instances"][0]["pid"]
    first_output = daemon.output()

    assert daemon.stop() == 0                             # Ctrl-C
    deadline = time.monotonic() + 5
    while any(pid_alive(p) for p in engines) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(pid_alive(p) for p in engines), "an engine outlived the daemon"

    daemon.start()                                        # same data dir, same ports
    first_look = daemon.api("/api/models/tiny")[1]["instances"][0]
    assert first_look["pid"] != old_pid                   # the journal's "running" is not trusted
    restarted_output = daemon.output()[len(first_output):]
    assert "Admin API key" not in restarted_output        # the key is shown only once
    model = daemon.wait_model("tiny", timeout=30)         # back without a new deploy
    assert model["ready_replicas"] == 1
    reply = client(daemon).chat.completions.create(model="tiny", messages=CHAT, max_tokens=16,
                                                   extra_body={"grammar": GRAMMAR})
    assert reply.choices[0].message.content == "hello there"
    assert daemon.stop() == 0


def test_ctrl_c_during_start_up_stops_it(workdir: Path) -> None:
    for delay in (0.2, 0.8):                  # before and during the Raft election
        data_dir = workdir / f"early-{delay}"
        process = subprocess.Popen(
            [sys.executable, "-m", "gpumesh", "up", "--data-dir", str(data_dir),
             "--api-port", str(free_port()), "--raft-port", str(free_port())],
            cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        time.sleep(delay)
        process.send_signal(signal.SIGINT)
        try:
            output, _ = process.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            raise AssertionError(f"Ctrl-C {delay} s into start-up was ignored")
        # 130 or -SIGINT: interrupted while Python was still importing, before anything
        # started (Python re-raises the signal on an uncaught KeyboardInterrupt, which Popen
        # reports as -2); 0: the daemon's own handler stopped start-up and undid its work.
        # 1 only when the interpreter itself was interrupted before it could run any module:
        # CPython prints "Could not import runpy module" and exits 1 (seen in a full run).
        interpreter_interrupted = ("Could not import runpy module" in output
                                   and "KeyboardInterrupt" in output)
        assert process.returncode in (0, 130, -signal.SIGINT) or (
            process.returncode == 1 and interpreter_interrupted), output
        assert process.returncode != 0 or "stopped" in output


def test_a_failed_start_says_why_and_exits_1(workdir: Path) -> None:
    try:
        import pynvml
        pynvml.nvmlInit()
        pytest.skip("this machine has NVIDIA GPUs, so forcing the NVIDIA probe succeeds")
    except pynvml.NVMLError:
        pass
    result = subprocess.run(
        [sys.executable, "-m", "gpumesh", "up", "--data-dir", str(workdir / "no-gpu"),
         "--api-port", str(free_port()), "--raft-port", str(free_port()),
         "--gpu-probe", "nvidia"], cwd=workdir, capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert "gpumesh could not start:" in result.stderr and "NVML" in result.stderr


def test_kill_9_of_the_daemon_takes_its_engine_along_and_loses_nothing(
        workdir: Path, tiny_model: Path) -> None:
    node = Daemon(workdir / "killed")
    node.start()
    try:
        assert node.cli("deploy", str(tiny_model), "--name", "tiny", "--wait").returncode == 0
        assert node.process is not None
        engines = children_of(node.process.pid)
        assert engines
        old_pid = node.wait_model("tiny")["instances"][0]["pid"]
        node.stop(signal.SIGKILL)                           # no clean shutdown at all
        deadline = time.monotonic() + 5
        while any(pid_alive(p) for p in engines) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(pid_alive(p) for p in engines), "an engine outlived a killed daemon"

        node.start()                                        # the journal has everything
        first_look = node.api("/api/models/tiny")[1]["instances"][0]
        assert first_look["pid"] != old_pid                 # no stale "running" from before
        assert node.wait_model("tiny", timeout=30)["ready_replicas"] == 1
        reply = client(node).chat.completions.create(model="tiny", messages=CHAT, max_tokens=16,
                                                     extra_body={"grammar": GRAMMAR})
        assert reply.choices[0].message.content == "hello there"
        assert node.stop() == 0
    finally:
        node.kill()
