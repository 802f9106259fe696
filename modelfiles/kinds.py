"""Model kinds and the OpenAI routes each kind answers.

A model's kind decides which engine can serve it and which `/v1` routes reach it: a chat
request to an embedding model is refused with a clear 400 instead of an engine's 404.
"""

from __future__ import annotations

__all__ = ["KINDS", "ROUTES_BY_KIND", "kind_serves"]

KINDS = ("llm", "vlm", "embedding", "rerank", "image", "stt", "tts")

# The /v1 paths a model of each kind answers (`/v1/models` answers for every kind).
ROUTES_BY_KIND: dict[str, frozenset[str]] = {
    "llm": frozenset({"/v1/chat/completions", "/v1/completions"}),
    "vlm": frozenset({"/v1/chat/completions", "/v1/completions"}),
    "embedding": frozenset({"/v1/embeddings"}),
    "rerank": frozenset({"/v1/rerank", "/v1/score"}),
    "image": frozenset({"/v1/images/generations", "/v1/images/edits"}),
    "stt": frozenset({"/v1/audio/transcriptions", "/v1/audio/translations"}),
    "tts": frozenset({"/v1/audio/speech"}),
}


def kind_serves(kind: str | None, path: str) -> bool:
    """Whether a model of `kind` answers `path`; a model recorded before kinds existed is an llm."""
    return path in ROUTES_BY_KIND.get(kind or "llm", frozenset())
