"""The OpenAI routes the gateway relays, and how each finds the model a request is for.

A JSON body is parsed once to find `model` (never re-encoded on its way to the engine), by
orjson where it is installed (several times faster than the standard library, which still
has the last word on what orjson refuses: NaN, lone surrogates, UTF-16 …, so what a body may
hold is unchanged). orjson reads integers past 64 bits as floats: the few paths that
re-encode a body parse it again exactly (`exact_payload`). A multipart body (audio
transcriptions) is read once and scanned in place for its `model` field: the uploaded file
is neither copied nor parsed. Any body that cannot name a model is
a 400, whatever it holds (deep nesting, bytes that are not UTF-8, no `model` …).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from ..errors import openai_error

try:
    from orjson import loads as fast_loads
except ImportError:         # a dependency, but the gateway works without it (the bench too)
    fast_loads = json.loads

__all__ = ["ENDPOINTS", "Endpoint", "ask_for_usage", "exact_payload", "fast_loads",
           "image_part", "multipart_field", "plain_documents", "read_model"]


@dataclass(frozen=True, slots=True)
class Endpoint:
    path: str              # what clients call
    upstream: str          # what the engine is called on (aliases go to the canonical path)
    multipart: bool = False
    streams: bool = False  # may answer with server-sent events
    continues: bool = False  # a broken stream can be continued on another replica


CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"

ENDPOINTS: tuple[Endpoint, ...] = (
    Endpoint(CHAT, CHAT, streams=True, continues=True),
    Endpoint(COMPLETIONS, COMPLETIONS, streams=True, continues=True),
    Endpoint("/v1/embeddings", "/v1/embeddings"),
    Endpoint("/v1/rerank", "/v1/rerank"),
    Endpoint("/rerank", "/v1/rerank"),           # Jina's path
    Endpoint("/v2/rerank", "/v1/rerank"),        # Cohere's v2 path (same body shape)
    Endpoint("/v1/score", "/v1/score"),
    Endpoint("/v1/images/generations", "/v1/images/generations"),
    Endpoint("/v1/images/edits", "/v1/images/edits", multipart=True),
    Endpoint("/v1/audio/transcriptions", "/v1/audio/transcriptions", multipart=True),
    Endpoint("/v1/audio/translations", "/v1/audio/translations", multipart=True),
    Endpoint("/v1/audio/speech", "/v1/audio/speech"),
)

_NO_MODEL = "the request body must be a JSON object with a string 'model' field"
_NO_FORM_MODEL = "the request must be multipart/form-data with a 'model' field"


def read_model(endpoint: Endpoint, body: bytes,
               content_type: str) -> tuple[str, dict[str, Any] | None] | web.Response:
    """(model name, parsed JSON payload or None for multipart) or a 400 to answer."""
    if endpoint.multipart:
        model = multipart_field(body, content_type, "model")
        if not model:
            return openai_error(400, _NO_FORM_MODEL, param="model")
        return model, None
    try:
        payload = fast_loads(body)
    except (ValueError, RecursionError):    # orjson's JSONDecodeError is a ValueError
        try:
            payload = json.loads(body)
        except (ValueError, RecursionError):   # UnicodeDecodeError is a ValueError
            return openai_error(400, _NO_MODEL, param="model")
    # Both parsers make plain dicts and strs: `type() is` is the quick isinstance here.
    if type(payload) is not dict or type(model := payload.get("model")) is not str:
        return openai_error(400, _NO_MODEL, param="model")
    return model, payload


def image_part(payload: dict[str, Any]) -> str | None:
    """Where the first image of a chat request is (`messages[i].content[j]`), or None.

    OpenAI's content parts: `{"type": "image_url", ...}` (and `input_image`, the Responses
    API's spelling that some clients send to chat too)."""
    messages = payload.get("messages")
    if type(messages) is not list:
        return None
    for i, message in enumerate(messages):
        content = message.get("content") if type(message) is dict else None
        if type(content) is not list:
            continue                      # a plain string: the common case, no scan
        for j, part in enumerate(content):
            if type(part) is dict and part.get("type") in _IMAGE_PARTS:
                return f"messages[{i}].content[{j}]"
    return None


_IMAGE_PARTS = frozenset({"image_url", "input_image"})


def exact_payload(body: bytes) -> dict[str, Any]:
    """The request body as the standard library reads it (integers of any size stay
    integers), for the paths that re-encode it. Only called on a body read_model took."""
    payload = json.loads(body)
    assert isinstance(payload, dict)
    return payload


def multipart_field(body: bytes, content_type: str, name: str) -> str | None:
    """The value of the form field `name` in a multipart/form-data body, found in place."""
    boundary = _boundary(content_type)
    if boundary is None:
        return None
    delimiter = b"--" + boundary
    wanted = f'name="{name}"'.encode()
    position = body.find(delimiter)
    while position >= 0:
        headers_start = position + len(delimiter)
        if body.startswith(b"--", headers_start):          # the closing delimiter
            return None
        headers_end = body.find(b"\r\n\r\n", headers_start)
        if headers_end < 0:
            return None
        next_part = body.find(b"\r\n" + delimiter, headers_end)
        if next_part < 0:
            return None
        headers = body[headers_start:headers_end]
        if wanted in headers and b"filename=" not in headers:
            try:
                return body[headers_end + 4:next_part].decode().strip() or None
            except UnicodeDecodeError:
                return None
        position = next_part + 2
    return None


def _boundary(content_type: str) -> bytes | None:
    kind, _, params = content_type.partition(";")
    if kind.strip().lower() != "multipart/form-data":
        return None
    for param in params.split(";"):
        key, _, value = param.strip().partition("=")
        if key.lower() == "boundary" and value:
            try:
                return value.strip().strip('"').encode("ascii")
            except UnicodeEncodeError:
                return None
    return None


RERANK = "/v1/rerank"


def plain_documents(body: bytes, payload: dict[str, Any]) -> bytes:
    """Cohere's rerank takes documents as `{"text": ...}` objects too; engines (llama.cpp,
    vLLM) take strings: such a body is re-encoded with the texts, any other left as it is."""
    documents = payload.get("documents")
    if not isinstance(documents, list) or not any(isinstance(d, dict) for d in documents):
        return body
    payload = exact_payload(body)
    texts = [d.get("text") if isinstance(d, dict) else d for d in payload["documents"]]
    return json.dumps({**payload, "documents": texts}).encode()


_USAGE_OPTION = b'"stream_options":{"include_usage":true},'


def ask_for_usage(body: bytes, payload: dict[str, Any]) -> tuple[bytes, bool]:
    """The body to send for a streamed request so that the engine reports usage at the end,
    and whether the usage chunk must be kept from the client (who did not ask for it)."""
    options = payload.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage") is True:
        return body, False
    if "stream_options" not in payload:
        start = 0 if body[:1] == b"{" else len(body) - len(body.lstrip())
        if body[start:start + 1] == b"{":
            # Splice the option in after the brace: the client's bytes stay as they are.
            return body[:start + 1] + _USAGE_OPTION + body[start + 1:], True
        options = {}
    if not isinstance(options, dict):
        return body, False              # the engine will say what is wrong with it
    payload = exact_payload(body)
    return (json.dumps({**payload, "stream_options": {**options, "include_usage": True}})
            .encode(), True)
