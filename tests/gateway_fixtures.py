"""What the gateway's tests share: a real llama.cpp engine process, a stand-in OpenAI server
for what no engine here can serve (images, audio), and OpenAI clients.

`LlamaEngine` runs `python -m gpumesh.backends.llama_cpp_runner` on a tiny random GGUF, with
the key the gateway will send (derived as the node derives it), so the engine refuses
everyone else, as it does under a real node agent.

`openai_style_app` is a small aiohttp server speaking OpenAI's shapes for the routes no
engine on this machine serves (image generation, speech, transcription): the engine of a
`custom`-like instance. It also answers chat with a delay or a hang when told to, for the
limit and timeout tests.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from aiohttp import web
from harness import free_port

ENGINE_TIMEOUT = 60.0
CHAT = [{"role": "user", "content": "Say hello."}]
GRAMMAR = 'root ::= "hello there"'
FAKE_USAGE = {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12}
SEEN = web.AppKey("seen", list)       # what the stand-in engine received, for assertions


class LlamaEngine:
    """One llama.cpp engine process on loopback."""

    def __init__(self, model: Path, log_file: Path, *extra: str, api_key: str | None = None,
                 context: int = 256) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_file = log_file
        self._log = log_file.open("wb")
        env = {**os.environ}
        if api_key is not None:
            env["LLAMA_API_KEY"] = api_key
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gpumesh.backends.llama_cpp_runner", "-m", str(model),
             "--host", "127.0.0.1", "--port", str(self.port), "--alias", "tiny",
             "-c", str(context), "-ngl", "0", "-lv", "1", *extra],
            stdout=self._log, stderr=subprocess.STDOUT, env=env)

    def wait_healthy(self) -> "LlamaEngine":
        deadline = time.monotonic() + ENGINE_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=1) as response:
                    if response.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"engine not healthy (exit {self.process.returncode}):\n"
                           f"{self.log_file.read_text(errors='replace')[-3000:]}")

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self._log.close()


def start_engines(*engines: LlamaEngine) -> list[LlamaEngine]:
    """Wait for engines started together (they load in parallel)."""
    try:
        return [engine.wait_healthy() for engine in engines]
    except Exception:
        for engine in engines:
            engine.stop()
        raise


def engine_that_dies(path: str, *, sends: bytes = b"", pause_s: float = 0.0,
                     headers: dict[str, str] | None = None) -> web.Application:
    """An engine whose connection drops mid-answer: its headers (SSE unless `headers` says
    otherwise), then `sends`, a pause, and the transport closed. (A real engine cannot be
    made to die at a chosen byte, so this one stands in.)"""
    async def answer(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers=headers or {"Content-Type": "text/event-stream"})
        await response.prepare(request)
        if sends:
            await response.write(sends)
        if pause_s:
            await asyncio.sleep(pause_s)
        assert request.transport is not None
        request.transport.close()       # the "engine" is gone; the body is cut
        return response

    app = web.Application()
    app.router.add_post(path, answer)
    return app


def openai_style_app(key: str | None = None) -> web.Application:
    """A stand-in engine: OpenAI's shapes, fixed answers, and `usage` where OpenAI has it.

    Chat takes `"delay": seconds` (answer late) and `"hang": true` (stream one event, then
    go silent for a minute), so the tests can hold requests in flight or hang a stream.
    """
    seen: list[dict[str, Any]] = []

    def authorised(request: web.Request) -> bool:
        return key is None or request.headers.get("Authorization") == f"Bearer {key}"

    async def chat(request: web.Request) -> web.StreamResponse:
        if not authorised(request):
            return web.json_response({"error": {"message": "no"}}, status=401)
        body = await request.json()
        seen.append({"path": request.path, "body": body})
        await asyncio.sleep(float(body.get("delay", 0)))
        if not body.get("stream"):
            return web.json_response({
                "id": "chatcmpl-fake", "object": "chat.completion", "created": 1,
                "model": body["model"], "usage": FAKE_USAGE,
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": "fake answer"}}]})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for piece in ("fake", " answer"):
            await response.write(_event({"id": "chatcmpl-fake", "object": "chat.completion.chunk",
                                         "choices": [{"index": 0, "delta": {"content": piece},
                                                      "finish_reason": None}]}))
            if body.get("hang"):
                await asyncio.sleep(60)
        if (body.get("stream_options") or {}).get("include_usage"):
            await response.write(_event({"id": "chatcmpl-fake", "choices": [],
                                         "usage": FAKE_USAGE}))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def images(request: web.Request) -> web.Response:
        if not authorised(request):
            return web.json_response({"error": {"message": "no"}}, status=401)
        body = await request.json()
        seen.append({"path": request.path, "body": body})
        pixel = base64.b64encode(b"\x89PNG fake").decode()
        answer = web.json_response({"created": 1,
                                    "data": [{"b64_json": pixel}] * body.get("n", 1)})
        if body.get("x_gzip"):    # compressed although nobody asked: the bytes pass as they are
            answer.body = gzip.compress(answer.body)
            answer.headers["Content-Encoding"] = "gzip"
        return answer

    async def speech(request: web.Request) -> web.StreamResponse:
        if not authorised(request):
            return web.json_response({"error": {"message": "no"}}, status=401)
        body = await request.json()
        seen.append({"path": request.path, "body": body})
        response = web.StreamResponse(headers={"Content-Type": "audio/mpeg"})
        await response.prepare(request)
        for _ in range(3):                    # chunked, unsized: relayed as it comes
            await response.write(b"ID3" + body["input"].encode() * 100)
        await response.write_eof()
        return response

    async def transcribe(request: web.Request) -> web.Response:
        if not authorised(request):
            return web.json_response({"error": {"message": "no"}}, status=401)
        form = await request.post()
        upload = form["file"]
        audio = upload.file.read()
        seen.append({"path": request.path, "model": form["model"], "bytes": len(audio),
                     "filename": upload.filename})
        return web.json_response({"text": f"{len(audio)} bytes of {upload.filename}",
                                  "usage": {"type": "duration", "seconds": 1}})

    app = web.Application(client_max_size=64 << 20)
    app[SEEN] = seen
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post("/v1/images/generations", images)
    app.router.add_post("/v1/audio/speech", speech)
    app.router.add_post("/v1/audio/transcriptions", transcribe)
    return app


def _event(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


# --- seeding an in-process node ----------------------------------------------------------------

def bootstrap(node: Any) -> str:
    """The first admin (as the daemon mints it) and a node record per gateway; the key."""
    from gpumesh.mesh.auth import ADMIN, new_api_key, new_user
    key, record = new_api_key("admin", ADMIN, user="admin")
    node.submit({"op": "create_api_key", "key": record, "only_if_no_admin": True,
                 "create_user": new_user("admin", ADMIN)})
    for node_id, url in zip(node.node_ids, node.urls):
        node.submit({"op": "upsert_node", "node": {"id": node_id, "name": node_id,
                                                   "status": "ready", "api_url": url,
                                                   "updated": time.time()}})
    return key


def add_model(node: Any, name: str, gguf: Path, instances: list[tuple[str, str, int]],
              kind: str | None = None) -> None:
    """A model and its running instances, as the reconciler and the agents would leave them.
    `kind` other than the file's own is set afterwards (stand-in engines serve any kind)."""
    from inprocess import instance_record

    from gpumesh.mesh.deployments import build_model_record
    record = build_model_record({"name": name, "source": str(gguf),
                                 "replicas": max(1, len(instances))})
    node.submit({"op": "create_model", "model": record})
    if kind is not None:
        node.submit({"op": "update_model", "name": name, "changes": {"kind": kind}})
    for instance_id, node_id, port in instances:
        node.submit({"op": "create_instance", "instance": instance_record(
            instance_id, name, "running", node_id, port=port)})


def api_call(url: str, method: str, key: str | None, body: Any = None,
             **kwargs: Any) -> Any:
    from inprocess import http_request
    return asyncio.run(http_request(url, method, key=key, json_body=body, **kwargs))
