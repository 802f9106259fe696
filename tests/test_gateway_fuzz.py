"""Hostile input, every kind of it a 4xx in OpenAI's shape, never a 500 or a traceback.

Found by fuzzing before this module existed: deep JSON nesting (RecursionError) and key
headers that are not UTF-8 (rejected before any auth ran) answered 500. A bounded,
seeded fuzz of bodies for every POST route guards the rest.
"""

from __future__ import annotations

import json
import logging
import random
import socket
import zlib

import pytest
from gateway_fixtures import add_model, api_call, bootstrap
from inprocess import InProcessNode, raft_threads
from tinymodels import write_tiny_gguf

from gpumesh.mesh.gateway import ENDPOINTS

NODE = "node-fuzz"
FUZZ_CASES = 25            # per route, seeded: the same bodies every run
DEEP = 100_000


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory):
    workdir = tmp_path_factory.mktemp("fuzz")
    node = InProcessNode(workdir / "raft", (NODE,))
    node.start()
    node.admin = bootstrap(node)
    # A model with no running instance: a body that gets past every check is a 503, which
    # the assertions tell apart from a crash.
    add_model(node, "tiny", write_tiny_gguf(workdir / "tiny.gguf"), [])
    yield node
    node.stop()
    assert raft_threads() == []


def raw_request(url: str, head: bytes, body: bytes = b"") -> tuple[int, bytes]:
    """One HTTP/1.1 request written byte for byte (clients refuse to send bad headers)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(head + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
                     .encode() + body)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    status = int(data.split(b" ", 2)[1])
    return status, data.split(b"\r\n\r\n", 1)[1]


def assert_openai_4xx(status: int, body: bytes, context: object) -> None:
    assert 400 <= status < 500, (status, body[:300], context)
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}, context


@pytest.mark.parametrize("header", [b"Authorization: Bearer \xff\xfe\xfd",
                                    b"Authorization: Bearer gm-\xc3\x28-x",
                                    b"X-API-Key: \xe2\x82",
                                    b"Authorization: \x80\x81 \x82",
                                    b"X-Gpumesh-Forward: \xff\xff"])
@pytest.mark.parametrize("method, path", [(b"GET", b"/v1/models"),
                                          (b"POST", b"/v1/chat/completions"),
                                          (b"GET", b"/api/models"),
                                          (b"GET", b"/api/usage")])
def test_key_headers_that_are_not_utf8_are_401(node, caplog, header, method, path) -> None:
    with caplog.at_level(logging.ERROR):
        status, body = raw_request(node.url, method + b" " + path + b" HTTP/1.1\r\n"
                                   b"Host: x\r\n" + header + b"\r\n", b'{"model":"tiny"}')
    assert status == 401, body
    assert_openai_4xx(status, body, header)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize("method, path", [
    ("POST", "/v1/chat/completions"), ("POST", "/v1/embeddings"), ("POST", "/v1/rerank"),
    ("POST", "/api/models"), ("PATCH", "/api/models/tiny"), ("POST", "/api/keys"),
    ("POST", "/api/users"), ("PATCH", "/api/users/admin")])
def test_deeply_nested_json_is_400(node, caplog, method, path) -> None:
    deep = b'{"model": "tiny", "x": ' + b"[" * DEEP + b"]" * DEEP + b"}"
    with caplog.at_level(logging.ERROR):
        reply = api_call(node.url + path, method, node.admin, data=deep,
                         headers={"Content-Type": "application/json"})
    assert reply.status == 400, reply
    assert reply.error["type"] == "invalid_request_error"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def _fuzz_bodies(seed: int) -> list[tuple[bytes, str]]:
    rng = random.Random(seed)
    shapes = [lambda: rng.randbytes(rng.randint(0, 2000)),
              lambda: json.dumps({"model": rng.choice([None, 1, [], {}, "tiny", "\ud800x"[1:],
                                                       "x" * 300]),
                                  "messages": rng.choice([None, "s", [1], [{}]]),
                                  "stream": rng.choice([True, "yes", None]),
                                  "stream_options": rng.choice([None, 5, {"include_usage": 1}]),
                                  "documents": rng.choice([None, [{}], [{"text": 5}]])}).encode(),
              lambda: b'{"model": "tiny"' + rng.randbytes(rng.randint(0, 50)),
              lambda: b"\xef\xbb\xbf" + json.dumps({"model": "tiny"}).encode(),
              lambda: json.dumps({"model": "tiny"}).encode("utf-16")]
    types = ["application/json", "multipart/form-data; boundary=zz", "multipart/form-data",
             "text/plain", "multipart/form-data; boundary=\"\u00e9\""]
    return [(rng.choice(shapes)(), rng.choice(types)) for _ in range(FUZZ_CASES)]


@pytest.mark.parametrize("path", sorted({e.path for e in ENDPOINTS}))
def test_fuzzed_bodies_never_crash_a_route(node, caplog, path) -> None:
    with caplog.at_level(logging.ERROR):
        for body, content_type in _fuzz_bodies(zlib.crc32(path.encode())):
            reply = api_call(node.url + path, "POST", node.admin, data=body,
                             headers={"Content-Type": content_type.encode("latin-1", "replace")
                                      .decode("latin-1")})
            # 503: it named the model and got past every check (no instance runs).
            assert reply.status < 500 or reply.status == 503, (reply, body[:100], content_type)
            reply.error                                   # OpenAI-shaped, whatever the code
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize("body", [
    b"--zz\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\n",          # cut short
    b"--zz\r\nContent-Disposition: form-data; name=\"file\"; filename=\"model\"\r\n\r\nx\r\n--zz--",
    b"--other\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\ntiny\r\n--other--",
    b"--zz\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\n\xff\xfe\r\n--zz--"])
def test_a_transcription_form_without_a_readable_model_is_400(node, body) -> None:
    reply = api_call(node.url + "/v1/audio/transcriptions", "POST", node.admin, data=body,
                     headers={"Content-Type": "multipart/form-data; boundary=zz"})
    assert reply.status == 400 and reply.error["param"] == "model", reply


def test_the_fast_parser_reads_bodies_as_the_standard_library_does(monkeypatch) -> None:
    """read_model parses with orjson where it is installed: every body, fuzzed or odd, must
    name the same model (or be the same 400) as with the standard library alone."""
    from gpumesh.mesh.gateway import endpoints
    odd = [b'{"model": "tiny", "x": NaN}', b'{"model": "tiny", "n": 123456789012345678901234567890}',
           b'{"model": "a", "model": "tiny"}', b'{"model": "\\ud800"}', b'{"model": "t\\u00e9"}',
           b"[" * 5000 + b"]" * 5000, b'{"model": "tiny"} x', b'  {"model": "tiny"}\n', b"",
           b'{"model": 5}', b'"tiny"']
    chat = next(e for e in ENDPOINTS if e.path == "/v1/chat/completions")
    bodies = odd + [body for body, _ in _fuzz_bodies(7)]

    def outcomes() -> list[object]:
        out: list[object] = []
        for body in bodies:
            parsed = endpoints.read_model(chat, body, "application/json")
            out.append(parsed[0] if isinstance(parsed, tuple) else parsed.status)
        return out

    fast = outcomes()
    monkeypatch.setattr(endpoints, "fast_loads", json.loads)
    assert fast == outcomes()
    assert fast[:4] == ["tiny", "tiny", "tiny", "\ud800"]
