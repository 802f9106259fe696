"""The llama.cpp backend: launch specs, the registry, and the xllamacpp runner for real."""

from __future__ import annotations

import http.client
import importlib.metadata
import json
import os
import select
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from harness import free_port
from openai import OpenAI
from tinymodels import write_tiny_gguf

from gpumesh.backends.base import BackendUnavailable, LaunchRequest
from gpumesh.backends.llama_cpp import LLAMA_SERVER_ENV, RUNNER_MODULE, LlamaCppBackend
from gpumesh.backends.registry import (
    UnknownBackend,
    UnsupportedModelFormat,
    backend_names,
    default_backend_for,
    get_backend,
)

RUNNER = (sys.executable, "-m", RUNNER_MODULE)
QUIET = ("-lv", "1")   # llama.cpp logs errors only, so a failing test shows them plainly


# --- fixtures and helpers ----------------------------------------------------------


@pytest.fixture
def tiny_gguf(tmp_path: Path) -> Path:
    return write_tiny_gguf(tmp_path / "tiny.gguf", context_length=256)


@pytest.fixture
def no_binary(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No llama-server anywhere: the backend must use the xllamacpp runner."""
    monkeypatch.delenv(LLAMA_SERVER_ENV, raising=False)
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))


def _fake_llama_server(directory: Path, devices: str = "Available devices:\n") -> Path:
    """An executable that answers `--version` (on stderr) and `--list-devices` (on stdout)
    as llama-server does."""
    directory.mkdir(exist_ok=True)
    binary = directory / "llama-server"
    binary.write_text('#!/bin/sh\n'
                      'if [ "$1" = "--list-devices" ]; then printf "$DEVICES"; exit 0; fi\n'
                      'echo "version: 6496 (2a1a5c33)" >&2\necho "built with cc" >&2\n'
                      .replace("$DEVICES", devices.replace("\n", "\\n")))
    binary.chmod(binary.stat().st_mode | stat.S_IXUSR)
    return binary


def _wait_healthy(port: int, proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"runner exited early with {proc.returncode}"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError):
            pass
        time.sleep(0.02)
    raise AssertionError(f"runner not healthy on port {port} after {timeout} s")


def _readline(stream, timeout: float) -> str:  # type: ignore[no-untyped-def]
    ready, _, _ = select.select([stream], [], [], timeout)
    assert ready, f"no output within {timeout} s"
    return stream.readline().decode()


def _is_gone(pid: int) -> bool:
    """Exited: no /proc entry, or a zombie nobody has reaped yet (its parent is dead)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")


def _request(model: Path, **kwargs: Any) -> LaunchRequest:
    return LaunchRequest(**{"model_path": str(model), "served_name": "tiny", "port": 8081, **kwargs})


# --- launch specs -----------------------------------------------------------------


def test_cpu_launch_runs_the_xllamacpp_runner_with_llama_server_flags(tiny_gguf: Path, no_binary: None) -> None:
    spec = LlamaCppBackend().launch(_request(tiny_gguf))

    assert spec.argv == RUNNER + (
        "-m", str(tiny_gguf), "--host", "127.0.0.1", "--port", "8081", "--alias", "tiny",
        "-c", "256",   # the default context (4096) capped by the model's own (256)
        "-ngl", "0",
    )
    assert spec.env == {"CUDA_VISIBLE_DEVICES": "-1", "HIP_VISIBLE_DEVICES": "-1"}


def test_default_context_is_4096_for_a_long_context_model(tmp_path: Path, no_binary: None) -> None:
    model = write_tiny_gguf(tmp_path / "long.gguf", context_length=131072)
    argv = LlamaCppBackend().launch(_request(model)).argv
    assert argv[argv.index("-c") + 1] == "4096"


def test_nvidia_launch_offloads_all_layers_to_the_assigned_gpus(tiny_gguf: Path, no_binary: None) -> None:
    request = _request(tiny_gguf, gpu_vendor="nvidia", gpu_indices=(2, 3), context_length=8192,
                       extra_args=("--embeddings", "-t", "4"))
    spec = LlamaCppBackend().launch(request)

    assert spec.argv[spec.argv.index("-ngl") + 1] == "999"
    assert spec.argv[spec.argv.index("-c") + 1] == "8192"
    assert spec.argv[-3:] == ("--embeddings", "-t", "4")   # pass-through comes last
    assert spec.env == {"CUDA_VISIBLE_DEVICES": "2,3", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}


def test_amd_launch_sets_hip_visible_devices(tiny_gguf: Path, no_binary: None) -> None:
    spec = LlamaCppBackend().launch(_request(tiny_gguf, gpu_vendor="amd", gpu_indices=(1,)))

    assert spec.env == {"HIP_VISIBLE_DEVICES": "1"}
    assert spec.argv[spec.argv.index("-ngl") + 1] == "999"


def test_gpu_launch_errors(tiny_gguf: Path, no_binary: None) -> None:
    backend = LlamaCppBackend()
    with pytest.raises(BackendUnavailable, match="not on intel"):
        backend.launch(_request(tiny_gguf, gpu_vendor="intel", gpu_indices=(0,)))
    with pytest.raises(ValueError, match="needs gpu_indices"):
        backend.launch(_request(tiny_gguf, gpu_vendor="nvidia"))


def test_a_model_directory_launches_its_gguf_file(tiny_gguf: Path, no_binary: None) -> None:
    argv = LlamaCppBackend().launch(_request(tiny_gguf.parent)).argv
    assert argv[len(RUNNER):len(RUNNER) + 2] == ("-m", str(tiny_gguf))


def test_a_llama_server_on_path_is_preferred(tiny_gguf: Path, no_binary: None,
                                             monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    binary = _fake_llama_server(tmp_path / "bin")
    monkeypatch.setenv("PATH", str(binary.parent))
    backend = LlamaCppBackend()

    spec = backend.launch(_request(tiny_gguf))
    assert spec.argv[0] == str(binary)
    assert spec.argv[1:] == LlamaCppBackend().launch(_request(tiny_gguf)).argv[1:]
    assert backend.version() == "6496 (2a1a5c33)"
    assert backend.describe()["engine"] == str(binary)


def test_the_env_var_names_the_binary_and_must_exist(tiny_gguf: Path, no_binary: None,
                                                     monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    binary = _fake_llama_server(tmp_path / "elsewhere")
    monkeypatch.setenv(LLAMA_SERVER_ENV, str(binary))
    assert LlamaCppBackend().launch(_request(tiny_gguf)).argv[0] == str(binary)

    monkeypatch.setenv(LLAMA_SERVER_ENV, str(tmp_path / "missing" / "llama-server"))
    with pytest.raises(BackendUnavailable, match=LLAMA_SERVER_ENV):
        LlamaCppBackend().version()


def test_version_comes_from_xllamacpp_without_a_binary(no_binary: None) -> None:
    backend = LlamaCppBackend()
    assert backend.version() == importlib.metadata.version("xllamacpp")
    summary = backend.describe()
    assert summary["available"] is True and summary["runs_on_cpu"] is True
    # The PyPI wheel is a CPU build: it must not claim GPUs it cannot drive.
    assert summary["model_formats"] == ["gguf"] and summary["gpu_vendors"] == []
    assert backend.usable_gpu_vendors() == frozenset()


def test_gpu_vendors_come_from_the_binarys_device_list(no_binary: None, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    # What `llama-server --list-devices` prints on a CUDA + HIP build (one line per device).
    binary = _fake_llama_server(tmp_path / "bin", devices=(
        "Available devices:\n"
        "  CUDA0: NVIDIA H200 (143771 MiB, 143156 MiB free)\n"
        "  ROCm0: AMD Instinct MI300X (196592 MiB, 196000 MiB free)\n"
        "  Vulkan0: llvmpipe (32000 MiB, 32000 MiB free)\n"))
    monkeypatch.setenv("PATH", str(binary.parent))
    assert LlamaCppBackend().usable_gpu_vendors() == frozenset({"nvidia", "amd"})

    cpu_build = _fake_llama_server(tmp_path / "cpu", devices="Available devices:\n")
    monkeypatch.setenv("PATH", str(cpu_build.parent))
    assert LlamaCppBackend().describe()["gpu_vendors"] == []


def test_unavailable_when_no_engine_is_installed(tiny_gguf: Path, no_binary: None,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # xllamacpp is a dependency and cannot be uninstalled here: make its lookup fail.
    def not_installed(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    with pytest.raises(BackendUnavailable, match="pip install xllamacpp"):
        LlamaCppBackend().launch(_request(tiny_gguf))
    assert LlamaCppBackend().describe()["available"] is False


# --- registry -----------------------------------------------------------------------


def test_registry_finds_llama_cpp() -> None:
    assert backend_names()[0] == "llama.cpp"      # first: the default for GGUF
    assert isinstance(get_backend("llama.cpp"), LlamaCppBackend)
    assert isinstance(get_backend(" LLaMA.CPP "), LlamaCppBackend)
    for kind in ("llm", "vlm", "embedding", "rerank"):
        assert isinstance(default_backend_for("gguf", kind), LlamaCppBackend)


def test_registry_errors_name_what_is_known() -> None:
    with pytest.raises(UnknownBackend) as unknown:
        get_backend("no-such-engine")
    assert isinstance(unknown.value, KeyError)
    assert str(unknown.value) == ("unknown backend 'no-such-engine'; known backends: "
                                  + ", ".join(backend_names()))

    with pytest.raises(UnsupportedModelFormat) as unsupported:
        default_backend_for("gguf", "image")
    assert "no backend serves image models in 'gguf' format" in str(unsupported.value)
    assert "gguf kinds served: " in str(unsupported.value)


# --- the runner, for real -----------------------------------------------------------


def test_runner_serves_chat_and_stops_on_sigterm(tiny_gguf: Path, no_binary: None, tmp_path: Path) -> None:
    port = free_port()
    spec = LlamaCppBackend().launch(_request(tiny_gguf, port=port, extra_args=QUIET))
    log = (tmp_path / "runner.log").open("wb")
    proc = subprocess.Popen(spec.argv, env={**os.environ, **spec.env}, stdout=subprocess.PIPE, stderr=log)
    try:
        _wait_healthy(port, proc)
        _check_models(port)
        _check_no_embeddings(port)
        _check_chat(port)
        _check_streamed_chat(port)

        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 0
        assert time.monotonic() - started < 3
        assert f"listening on http://127.0.0.1:{port}" in proc.stdout.read().decode()  # type: ignore[union-attr]
    finally:
        proc.kill()
        proc.wait()
        log.close()


def _check_models(port: int) -> None:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5) as r:
        models = json.load(r)
    assert [m["id"] for m in models["data"]] == ["tiny"]


def _check_no_embeddings(port: int) -> None:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/embeddings", method="POST",
                                     data=b'{"model": "tiny", "input": "x"}',
                                     headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=5)
    assert refused.value.code == 501   # not asked for with --embeddings


def _check_chat(port: int) -> None:
    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=30)
    answer = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=6,
        extra_body={"ignore_eos": True},   # random weights may pick </s> at once
    )
    assert answer.object == "chat.completion" and answer.model == "tiny"
    assert answer.choices[0].message.role == "assistant"
    assert answer.choices[0].finish_reason == "length"
    assert answer.usage is not None
    assert answer.usage.completion_tokens == 6 and answer.usage.prompt_tokens > 0
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + 6


def _check_streamed_chat(port: int) -> None:
    # llama.cpp sends the role chunk with the first token only if that token is whole
    # UTF-8 text; random weights often start with a stray byte. A grammar keeps the
    # answer ASCII so the full sequence is checked every time.
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 5,
            "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True,
            "grammar": "root ::= [a-z]+"}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    assert response.getheader("Content-Type", "").startswith("text/event-stream")
    events = [line[len(b"data: "):].decode().rstrip("\r\n") for line in response if line.startswith(b"data: ")]
    conn.close()

    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    with_choices = [c["choices"][0] for c in chunks if c["choices"]]
    assert with_choices[0]["delta"]["role"] == "assistant"                   # the role comes first,
    assert any(ch["delta"].get("content") for ch in with_choices[1:-1])     # then text,
    assert [ch["finish_reason"] for ch in with_choices][-1] == "length"      # then the finish,
    assert all(ch["finish_reason"] is None for ch in with_choices[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 5   # usage last


def test_runner_stops_cleanly_right_after_it_starts(tiny_gguf: Path) -> None:
    # A stop just after start used to race the engine's loop start-up and hang (about
    # one run in seven with llama.cpp's default logging, which widens the window):
    # twenty in a row catch that again about 19 times in 20.
    for _ in range(20):
        proc = subprocess.Popen([*RUNNER, "-m", str(tiny_gguf), "--port", "0", "-c", "256", "-ngl", "0"],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        try:
            assert "listening on" in _readline(proc.stdout, timeout=10)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=3) == 0
        finally:
            proc.kill()
            proc.wait()
            proc.stdout.close()  # type: ignore[union-attr]


def test_runner_serves_embeddings_only_when_asked(tiny_gguf: Path, no_binary: None, tmp_path: Path) -> None:
    port = free_port()
    extra = ("--embeddings", "--pooling", "mean", "-t", "1", "--parallel", "2", *QUIET)
    spec = LlamaCppBackend().launch(_request(tiny_gguf, port=port, extra_args=extra))
    proc = subprocess.Popen(spec.argv, env={**os.environ, **spec.env}, stdout=subprocess.DEVNULL)
    try:
        _wait_healthy(port, proc)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=30)
        result = client.embeddings.create(model="tiny", input=["hello world", "abc"])
        assert [len(e.embedding) for e in result.data] == [64, 64]   # n_embd of the tiny model
        assert result.usage.prompt_tokens > 0
    finally:
        proc.terminate()
        assert proc.wait(timeout=5) == 0


def test_runner_dies_when_its_parent_is_killed(tiny_gguf: Path) -> None:
    port = free_port()
    argv = list(RUNNER) + ["-m", str(tiny_gguf), "--port", str(port), "-c", "256", "-ngl", "0", *QUIET]
    # A stand-in for the gpumesh daemon: starts the runner, reports its pid, then waits.
    parent_code = ("import subprocess, sys, time; p = subprocess.Popen(sys.argv[1:]); "
                   "print(p.pid, flush=True); time.sleep(60)")
    parent = subprocess.Popen([sys.executable, "-c", parent_code, *argv], stdout=subprocess.PIPE)
    runner_pid = int(_readline(parent.stdout, timeout=10))
    try:
        _wait_healthy(port, parent)
        parent.kill()   # SIGKILL: the daemon gets no chance to stop its engines
        parent.wait()

        deadline = time.monotonic() + 1      # SIGKILL from the kernel: no shutdown to wait for
        while not _is_gone(runner_pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _is_gone(runner_pid), "the runner outlived its parent"
    finally:
        if not _is_gone(runner_pid):
            os.kill(runner_pid, signal.SIGKILL)
        parent.stdout.close()  # type: ignore[union-attr]


def test_runner_asks_for_sigterm_when_its_parent_dies() -> None:
    code = ("import ctypes, signal; from gpumesh.backends.llama_cpp_runner import request_parent_death_signal; "
            "assert request_parent_death_signal(signal.SIGTERM); v = ctypes.c_int(); "
            "ctypes.CDLL(None).prctl(2, ctypes.byref(v), 0, 0, 0); print(v.value)")   # 2: PR_GET_PDEATHSIG
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert int(out) == signal.SIGTERM


def test_runner_reports_a_missing_model() -> None:
    done = subprocess.run([*RUNNER, "-m", "/nonexistent/model.gguf", "--port", "0"],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 1
    assert "model file not found: /nonexistent/model.gguf" in done.stderr


def test_runner_reports_a_port_in_use(tiny_gguf: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([*RUNNER, "-m", str(tiny_gguf), "--port", str(port), *QUIET],
                              capture_output=True, text=True, timeout=30)
    assert done.returncode == 1
    assert "could not start" in done.stderr and f"127.0.0.1:{port}" in done.stderr


def test_the_runner_refuses_to_start_when_its_supervisor_is_already_gone(tiny_gguf: Path) -> None:
    # The daemon names itself in GPUMESH_SUPERVISOR_PID; a parent that is not that process
    # means the daemon died before the runner could ask for its parent-death signal.
    env = {**os.environ, "GPUMESH_SUPERVISOR_PID": "1"}
    done = subprocess.run([sys.executable, "-m", RUNNER_MODULE, "-m", str(tiny_gguf),
                           "--port", "0"], env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 1
    assert "supervisor 1 is gone before start" in done.stderr
