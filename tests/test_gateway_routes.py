"""The OpenAI routes beyond chat: embeddings and rerank (Jina's and Cohere's shapes) on real
llama.cpp engines (`--embeddings --pooling mean|rank`), and images, speech and
transcriptions on a stand-in OpenAI-style server: no engine on this machine generates images
or audio (tests/gateway_fixtures.py). Each is routed by model, checked against the model's
kind, and metered."""

from __future__ import annotations

import base64
import io
import time

import openai
import pytest
from gateway_fixtures import (SEEN, LlamaEngine, add_model, api_call, bootstrap,
                              openai_style_app, start_engines)
from inprocess import InProcessNode, node_secret, raft_threads
from tinymodels import write_tiny_gguf

from gpumesh.mesh.auth import engine_key

NODE = "node-routes"


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory):
    workdir = tmp_path_factory.mktemp("routes")
    gguf = write_tiny_gguf(workdir / "tiny.gguf")
    secret = node_secret(NODE)
    embed = LlamaEngine(gguf, workdir / "embed.log", "--embeddings", "--pooling", "mean",
                        api_key=engine_key(secret, "embed-1"))
    rerank = LlamaEngine(gguf, workdir / "rerank.log", "--embeddings", "--pooling", "rank",
                         api_key=engine_key(secret, "rerank-1"))
    node = InProcessNode(workdir / "raft", (NODE,))
    try:
        node.start()
        start_engines(embed, rerank)
        node.admin = bootstrap(node)
        add_model(node, "embed", gguf, [("embed-1", NODE, embed.port)], kind="embedding")
        add_model(node, "rerank", gguf, [("rerank-1", NODE, rerank.port)], kind="rerank")
        for kind in ("image", "tts", "stt", "vlm"):
            app = openai_style_app(engine_key(secret, f"{kind}-1"))
            node.stand_ins = getattr(node, "stand_ins", {}) | {kind: app}
            add_model(node, f"a-{kind}", gguf, [(f"{kind}-1", NODE, node.serve(app))],
                      kind=kind)
        yield node
    finally:
        node.stop()
        embed.stop()
        rerank.stop()
    assert raft_threads() == []


def client(node: InProcessNode) -> openai.OpenAI:
    return openai.OpenAI(base_url=node.url + "/v1", api_key=node.admin, max_retries=0,
                         timeout=30)


def test_embeddings_from_a_real_engine(node) -> None:
    reply = client(node).embeddings.create(model="embed", input=["hello world", "the cat"])
    assert [d.index for d in reply.data] == [0, 1]
    assert len(reply.data[0].embedding) == 64                   # the tiny model's width
    assert reply.usage.prompt_tokens > 0


@pytest.mark.parametrize("path, documents", [
    ("/v1/rerank", ["hello world", "the cat", "a"]),                       # Jina, llama.cpp
    ("/rerank", ["hello world", "the cat", "a"]),                          # Jina's path
    ("/v2/rerank", ["hello world", "the cat", "a"]),                       # Cohere v2
    ("/v1/rerank", [{"text": "hello world"}, {"text": "the cat"}, "a"]),   # Cohere v1 objects
])
def test_rerank_in_jina_and_cohere_shapes(node, path, documents) -> None:
    reply = api_call(node.url + path, "POST", node.admin,
                     {"model": "rerank", "query": "hello", "documents": documents, "top_n": 2})
    assert reply.status == 200, reply
    results = reply.body["results"]
    assert len(results) == 2 and {r["index"] for r in results} <= {0, 1, 2}
    assert all(isinstance(r["relevance_score"], float) for r in results)


def test_image_generation_is_routed_by_model(node) -> None:
    reply = client(node).images.generate(model="a-image", prompt="a cat", n=2)
    assert len(reply.data) == 2 and base64.b64decode(reply.data[0].b64_json).startswith(b"\x89PNG")
    assert node.stand_ins["image"][SEEN][-1]["body"]["prompt"] == "a cat"


def test_an_answer_the_engine_compressed_reaches_the_client_decodable(node) -> None:
    """The gateway relays bytes as they came: Content-Encoding goes with them."""
    reply = client(node).images.with_raw_response.generate(model="a-image", prompt="a cat",
                                                           n=3, extra_body={"x_gzip": True})
    assert reply.headers["content-encoding"] == "gzip"
    assert len(reply.parse().data) == 3


def test_speech_comes_back_as_binary_as_it_is_made(node) -> None:
    audio = client(node).audio.speech.create(model="a-tts", voice="alloy", input="hi")
    assert audio.content == (b"ID3" + b"hi" * 100) * 3
    assert audio.response.headers["content-type"] == "audio/mpeg"


def test_a_transcription_upload_finds_its_model_in_the_form(node) -> None:
    upload = io.BytesIO(b"RIFF" + bytes(range(256)) * 400)             # ~100 KiB, not UTF-8
    upload.name = "speech.wav"
    reply = client(node).audio.transcriptions.create(model="a-stt", file=upload)
    seen = node.stand_ins["stt"][SEEN][-1]
    assert (seen["model"], seen["filename"], seen["bytes"]) == ("a-stt", "speech.wav",
                                                              4 + 256 * 400)
    assert reply.text == f"{4 + 256 * 400} bytes of speech.wav"


def test_image_input_for_a_vlm_passes_through_untouched(node) -> None:
    picture = "data:image/png;base64," + base64.b64encode(b"\x89PNG" + bytes(500)).decode()
    content = [{"type": "text", "text": "What is this?"},
               {"type": "image_url", "image_url": {"url": picture}}]
    client(node).chat.completions.create(model="a-vlm",
                                         messages=[{"role": "user", "content": content}])
    assert node.stand_ins["vlm"][SEEN][-1]["body"]["messages"][0]["content"] == content


@pytest.mark.parametrize("path, model", [("/v1/chat/completions", "embed"),
                                         ("/v1/embeddings", "rerank"),
                                         ("/v1/images/generations", "a-tts"),
                                         ("/v1/audio/speech", "a-image")])
def test_a_route_the_kind_does_not_serve_is_a_clear_400(node, path, model) -> None:
    reply = api_call(node.url + path, "POST", node.admin,
                     {"model": model, "input": "x", "prompt": "x", "messages": []})
    assert reply.status == 400 and reply.error["code"] == "wrong_model_kind", reply


def test_every_route_is_metered(node) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        rows = api_call(node.url + "/api/usage?by=model", "GET", node.admin).body["data"]
        models = {r["model"]: r for r in rows}
        if {"embed", "rerank", "a-image", "a-tts", "a-stt", "a-vlm"} <= set(models):
            break
        time.sleep(0.2)
    assert models["rerank"]["requests"] == 4 and models["rerank"]["prompt_tokens"] > 0
    assert models["embed"]["prompt_tokens"] > 0
    assert models["a-tts"]["requests"] == 1 and models["a-tts"]["errors"] == 0
