"""API keys, shared by the gateway (/v1) and the management API (/api).

Keys look like `gm-<id>-<secret>`: the id lets people name a key (`gpumesh keys rm ID`)
without holding it, and the secret carries 256 bits. Only the SHA-256 of the whole key is
replicated: for random keys of that strength a fast hash is safe (there is nothing to
brute-force), and it lets every node check a key with one dict lookup on the hot path.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from typing import Any

from aiohttp import web

__all__ = ["ADMIN", "USER", "hash_key", "key_from_request", "new_api_key"]

ADMIN = "admin"
USER = "user"


def new_api_key(name: str, role: str) -> tuple[str, dict[str, Any]]:
    """A fresh key and the record to replicate (which never holds the key itself)."""
    key_id = secrets.token_hex(4)
    key = f"gm-{key_id}-{secrets.token_urlsafe(32)}"
    record = {"id": key_id, "hash": hash_key(key), "name": name, "role": role,
              "created": time.time()}
    return key, record


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def key_from_request(request: web.Request) -> str | None:
    """The bearer token, from `Authorization: Bearer …` (OpenAI clients) or `X-API-Key`."""
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return request.headers.get("X-API-Key") or None
