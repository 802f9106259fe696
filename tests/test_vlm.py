"""A vision-language model end to end on llama.cpp: `gpumesh up` deploys a folder holding a
GGUF language model and its multimodal projector (`mmproj-model.gguf`), detects it as a
`vlm`, starts the engine with `--mmproj`, and answers a chat with an image in it through the
gateway. Both files are random-weight and tiny (tests/tinymodels.py), so the answer is
pinned by a GBNF grammar and the image's effect is read where it is exact: the prompt grows
by one token per image patch. The same image sent to a plain llm is a clear 400. An image
sent as an http URL (served here on loopback, so the daemon runs with `--image-fetch any`)
is fetched by the gateway and reaches the engine inline (tests/test_images.py has the
policy and its refusals).
"""

from __future__ import annotations

import base64
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import openai
import pytest

from harness import Daemon
from tinymodels import image_tokens, tiny_png, write_tiny_gguf, write_tiny_mmproj

GRAMMAR = 'root ::= "hello there"'
QUESTION = {"type": "text", "text": "What is in this picture?"}
PICTURE = {"type": "image_url",
           "image_url": {"url": "data:image/png;base64," + base64.b64encode(tiny_png()).decode()}}


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory):
    workdir = tmp_path_factory.mktemp("vlm")
    write_tiny_gguf(workdir / "tiny-vlm" / "model.gguf")
    write_tiny_mmproj(workdir / "tiny-vlm" / "mmproj-model.gguf", text_n_embd=64)
    write_tiny_gguf(workdir / "tiny-llm" / "model.gguf")
    daemon = Daemon(workdir / "data", "--image-fetch", "any")
    daemon.start()
    try:
        for name in ("tiny-vlm", "tiny-llm"):      # both engines load at once
            deployed = daemon.cli("deploy", str(workdir / name), "--name", name)
            assert deployed.returncode == 0, deployed.stderr
        for name in ("tiny-vlm", "tiny-llm"):
            daemon.wait_model(name)
        yield daemon
    finally:
        daemon.kill()


class _PictureHandler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        picture = tiny_png()
        self.send_response(200 if self.path == "/picture.png" else 404)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(picture)))
        self.end_headers()
        self.wfile.write(picture)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def picture_url():
    """An http URL of the same PNG, served on loopback while the module runs."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _PictureHandler)
    thread = threading.Thread(target=server.serve_forever, name="picture-server", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/picture.png"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def client(node: Daemon) -> openai.OpenAI:
    return openai.OpenAI(base_url=node.url + "/v1", api_key=node.admin_key, max_retries=0,
                         timeout=30)


def chat(node: Daemon, model: str, content: str | list) -> openai.types.chat.ChatCompletion:
    return client(node).chat.completions.create(
        model=model, messages=[{"role": "user", "content": content}], max_tokens=16,
        extra_body={"grammar": GRAMMAR})


def test_a_gguf_with_its_projector_beside_it_is_a_vlm(node: Daemon) -> None:
    assert node.api("/api/models/tiny-vlm")[1]["kind"] == "vlm"
    assert node.api("/api/models/tiny-llm")[1]["kind"] == "llm"
    kinds = {m.id: m.model_extra["kind"] for m in client(node).models.list().data}
    assert kinds == {"tiny-vlm": "vlm", "tiny-llm": "llm"}
    # The engine was given the projector and loaded it.
    instance = node.api("/api/models/tiny-vlm")[1]["instances"][0]["id"]
    code, log = node.api(f"/api/instances/{instance}/logs?tail=1000")
    assert code == 200 and "loaded multimodal model" in log and "mmproj-model.gguf" in log, log


def test_a_chat_with_an_image_is_answered_and_the_image_reaches_the_model(node: Daemon) -> None:
    text_only = chat(node, "tiny-vlm", [QUESTION])
    seen = chat(node, "tiny-vlm", [QUESTION, PICTURE])
    twice = chat(node, "tiny-vlm", [QUESTION, PICTURE, PICTURE])
    for reply in (text_only, seen, twice):
        assert reply.choices[0].message.content == "hello there"
        assert reply.choices[0].finish_reason == "stop"
    # Each image became one embedding per 8-pixel patch of the 32-pixel tower's input (the
    # 16-pixel PNG is resized): 16 prompt positions the text alone does not have.
    per_image = image_tokens(image_size=32, patch_size=8)
    assert seen.usage.prompt_tokens - text_only.usage.prompt_tokens == per_image
    assert twice.usage.prompt_tokens - text_only.usage.prompt_tokens == 2 * per_image
    print(f"vlm prompt tokens: text {text_only.usage.prompt_tokens}, + 1 image "
          f"{seen.usage.prompt_tokens}, + 2 images {twice.usage.prompt_tokens}")
    # A plain string is still a chat, as for any llm.
    assert chat(node, "tiny-vlm", "Say hello.").choices[0].message.content == "hello there"


def test_an_image_url_is_fetched_by_the_gateway_and_reaches_the_model(node: Daemon,
                                                                      picture_url: str) -> None:
    """llama.cpp cannot fetch URLs (it answered a 500): the gateway inlines the image, and
    the engine sees exactly what the data: URL gives it."""
    remote = {"type": "image_url", "image_url": {"url": picture_url}}
    inline = chat(node, "tiny-vlm", [QUESTION, PICTURE])
    fetched = chat(node, "tiny-vlm", [QUESTION, remote])
    twice = chat(node, "tiny-vlm", [QUESTION, remote, PICTURE])
    assert fetched.choices[0].message.content == "hello there"
    assert fetched.usage.prompt_tokens == inline.usage.prompt_tokens
    per_image = image_tokens(image_size=32, patch_size=8)
    assert twice.usage.prompt_tokens == inline.usage.prompt_tokens + per_image
    with pytest.raises(openai.BadRequestError) as refused:
        chat(node, "tiny-vlm", [QUESTION, {"type": "image_url",
                                           "image_url": {"url": picture_url + ".missing"}}])
    assert refused.value.body["code"] == "image_fetch_failed"
    assert refused.value.body["param"] == "messages[0].content[1]"


def test_an_image_the_engine_cannot_decode_is_the_clients_400(node: Daemon) -> None:
    broken = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    with pytest.raises(openai.BadRequestError) as refused:
        chat(node, "tiny-vlm", [QUESTION, broken])
    assert "image" in refused.value.message.lower()


def test_an_image_for_a_model_without_a_projector_is_a_clear_400(node: Daemon) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        chat(node, "tiny-llm", [QUESTION, PICTURE])
    error = refused.value.body
    assert error["code"] == "image_input_not_supported"
    assert error["param"] == "messages[0].content[1]"
    assert "tiny-llm" in error["message"] and "does not take images" in error["message"]
    # Its text is served as before.
    assert chat(node, "tiny-llm", [QUESTION]).choices[0].message.content == "hello there"
