"""transformers serve for real, on this CPU machine: gpumesh installs transformers[serving] with
PyTorch's CPU build in its own virtual env (once per machine: the backends dir is shared, see
conftest.py), deploys a random-weight Llama the test writes (Hugging Face format), answers
chat through the gateway with the official client, and the engine dies with its daemon.

The launch flags that cannot run here (GPUs) are checked by transformers' own `serve` parser
from that env, through the runner's own way of calling it.

A tiny LLaVA (written with the engine's own torch) checks the VLM kind: an image in a chat
becomes image tokens.

Marked `slow`: ~25 s with the install cached (importing torch + transformers is most of an
engine's start here); the install itself ~15 s with an empty uv cache, ~2 s with a warm one.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest

from harness import Daemon, children_of, pid_alive, rss_kib
from tinymodels import tiny_png, write_tiny_hf_llama, write_tiny_hf_llava

from gpumesh.backends.base import LaunchRequest
from gpumesh.backends.transformers_serve import RUNNER_FILE, TransformersBackend

pytestmark = pytest.mark.slow

VERSION = os.environ.get("GPUMESH_TEST_TRANSFORMERS_VERSION", "5.24.0")   # = conftest's
CHAT = [{"role": "user", "content": "hello"}]


def test_transformers_serve_deployed_through_gpumesh_answers_chat_and_dies_with_its_daemon(
        tmp_path: Path, transformers_home: Path) -> None:
    model_dir = write_tiny_hf_llama(tmp_path / "tiny-llama")
    node = Daemon(tmp_path / "data")
    node.start()
    try:
        started = time.monotonic()
        deployed = node.cli("deploy", str(model_dir), "--name", "tiny-tf",
                            "--backend", f"transformers=={VERSION}", "--arg=--dtype=float32",
                            "--wait", "--timeout", "300", timeout=330)
        ready_s = time.monotonic() - started
        assert deployed.returncode == 0, deployed.stderr + node.output()[-3000:]
        model = node.wait_model("tiny-tf")
        assert (model["backend"], model["backend_version"], model["kind"]) == (
            "transformers", VERSION, "llm")
        instance = model["instances"][0]
        assert instance["engine"] == {"backend": "transformers", "version": VERSION,
                                      "runtime": "process", "image": None, "container": None}
        guard = instance["pid"]
        engines = children_of(guard)
        assert len(engines) == 1, engines                # the runner is the server: one process
        argv = Path(f"/proc/{engines[0]}/cmdline").read_bytes().decode().split("\0")
        assert argv[:3] == [str(transformers_home / "bin" / "python"), "-I", str(RUNNER_FILE)]

        client = openai.OpenAI(base_url=node.url + "/v1", api_key=node.admin_key,
                               max_retries=0, timeout=60)
        asked = time.monotonic()
        reply = client.chat.completions.create(model="tiny-tf", messages=CHAT, max_tokens=8)
        answer_s = time.monotonic() - asked
        assert reply.model == "tiny-tf" and reply.choices[0].message.role == "assistant"
        assert reply.usage.completion_tokens == 8            # random weights: never stops early
        chunks = list(client.chat.completions.create(model="tiny-tf", messages=CHAT,
                                                     max_tokens=4, stream=True))
        assert chunks and all(c.model == "tiny-tf" for c in chunks)
        assert chunks[-1].choices[0].finish_reason == "length"
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert streamed                                      # tokens arrived, not only frames

        # transformers serve checks no key; the runner in front of it does.
        engine_url = f"http://127.0.0.1:{instance['port']}"
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(engine_url + "/v1/models", timeout=10)
        assert refused.value.code == 401
        assert json.loads(refused.value.read())["error"]["code"] == "invalid_api_key"
        with urllib.request.urlopen(engine_url + "/health", timeout=10) as health:
            assert health.status == 200                      # the probes' path stays open

        rss_mib = rss_kib(engines[0]) / 1024
        estimate = model["estimate"]
        assert estimate["engine"] == "transformers"
        assert rss_kib(engines[0]) * 1024 <= estimate["by_device"]["cpu"], estimate  # booked enough

        # An image-text model: detected as a VLM, and answers a chat with an image in it.
        llava = write_tiny_hf_llava(tmp_path / "tiny-llava", transformers_home / "bin" / "python")
        deployed = node.cli("deploy", str(llava), "--name", "tiny-vlm", "--backend",
                            f"transformers=={VERSION}", "--wait", "--timeout", "300", timeout=330)
        assert deployed.returncode == 0, deployed.stderr + node.output()[-3000:]
        assert node.wait_model("tiny-vlm")["kind"] == "vlm"
        image = "data:image/png;base64," + base64.b64encode(tiny_png()).decode()
        seen = client.chat.completions.create(model="tiny-vlm", max_tokens=4, messages=[
            {"role": "user", "content": [{"type": "text", "text": "what is this?"},
                                         {"type": "image_url", "image_url": {"url": image}}]}])
        text_only = client.chat.completions.create(model="tiny-vlm", max_tokens=4, messages=[
            {"role": "user", "content": [{"type": "text", "text": "what is this?"}]}])
        assert seen.model == "tiny-vlm" and seen.usage.completion_tokens == 4
        # The image became tokens: its marker expands to one per 8-pixel patch of 32 pixels.
        assert seen.usage.prompt_tokens - text_only.usage.prompt_tokens == 16
        vlm = node.wait_model("tiny-vlm")["instances"][0]["pid"]
        engines += [vlm, *children_of(vlm)]

        # A flag transformers serve does not have: its own parser's words are the reason.
        bad = node.cli("deploy", str(model_dir), "--name", "bad-arg", "--backend",
                       f"transformers=={VERSION}", "--arg=--bogus-flag", "--wait",
                       "--timeout", "120", timeout=150)
        assert bad.returncode != 0
        reason = node.api("/api/models/bad-arg")[1]["instances"][0]["reason"]
        assert "error: No such option" in reason and "--bogus-flag" in reason, reason
        print(f"transformers {VERSION} (CPU): deployed and running in {ready_s:.1f} s, "
              f"first chat in {answer_s:.2f} s, engine RSS {rss_mib:.0f} MiB")

        node.stop(signal.SIGKILL)
        deadline = time.monotonic() + 15
        while any(pid_alive(p) for p in [guard, *engines]) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [p for p in [guard, *engines] if pid_alive(p)], "the engine outlived its daemon"
    finally:
        node.kill()


_PARSE = r"""
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("runner", sys.argv[1])
runner = importlib.util.module_from_spec(spec)
spec.loader.exec_module(runner)
import click
from transformers.cli.transformers import app
group = app if isinstance(app, click.Group) else runner._typer_command(app)
serve = group.commands["serve"]
out = {}
for name, (served, options) in json.loads(sys.argv[2]).items():
    context = serve.make_context("serve", runner.serve_arguments(serve, served, options))
    out[name] = {k: v for k, v in context.params.items()
                 if isinstance(v, (int, float, str, bool, type(None)))}
print("PARSED " + json.dumps(out))
"""


def test_launch_specs_pass_transformers_serves_own_parser(tmp_path: Path,
                                                          transformers_home: Path) -> None:
    model = str(write_tiny_hf_llama(tmp_path / "m"))
    backend = TransformersBackend()
    home = str(transformers_home)
    specs = {
        "cpu": backend.launch(LaunchRequest(model_path=model, served_name="org/tiny:v1",
                                            port=8001, engine_home=home, api_key="k3y",
                                            extra_args=("--dtype", "bfloat16"))),
        "one-gpu": backend.launch(LaunchRequest(model_path=model, served_name="g1", port=8002,
                                                gpu_vendor="nvidia", gpu_indices=(3,),
                                                engine_home=home)),
        "four-gpus": backend.launch(LaunchRequest(
            model_path=model, served_name="g4", port=8003, gpu_vendor="nvidia",
            gpu_indices=(0, 1, 2, 3), engine_home=home,
            extra_args=("--continuous-batching", "--attn-implementation", "sdpa"))),
    }
    cases = {}
    for name, spec in specs.items():
        argv = list(spec.argv)
        assert argv[:3] == [str(transformers_home / "bin" / "python"), "-I", str(RUNNER_FILE)]
        cut = argv.index("--")
        served = argv[argv.index("--served-name") + 1]
        assert argv[argv.index("--model-path") + 1] == model
        cases[name] = (served, argv[cut + 1:])
    done = subprocess.run([str(transformers_home / "bin" / "python"), "-I", "-c", _PARSE,
                           str(RUNNER_FILE), json.dumps(cases)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    parsed = json.loads(next(line for line in done.stdout.splitlines()
                             if line.startswith("PARSED "))[len("PARSED "):])

    cpu = parsed["cpu"]
    assert (cpu["force_model"], cpu["host"], cpu["port"], cpu["device"], cpu["dtype"]) == (
        "org/tiny:v1", "127.0.0.1", 8001, "cpu", "bfloat16")
    assert specs["cpu"].env["CUDA_VISIBLE_DEVICES"] == "-1"
    assert specs["cpu"].env["GPUMESH_ENGINE_KEY"] == "k3y"
    assert "k3y" not in " ".join(specs["cpu"].argv)
    one = parsed["one-gpu"]
    assert (one["force_model"], one["device"], one["port"]) == ("g1", "cuda:0", 8002)
    assert specs["one-gpu"].env["CUDA_VISIBLE_DEVICES"] == "3"       # cuda:0 is that GPU
    four = parsed["four-gpus"]
    assert (four["device"], four["continuous_batching"], four["attn_implementation"]) == (
        "auto", True, "sdpa")
    assert specs["four-gpus"].env["CUDA_VISIBLE_DEVICES"] == "0,1,2,3"
