"""Joining a cluster: join tokens, the newcomer's proof, and the sealed reply.

The API may be plain HTTP, so neither the token nor the cluster secret ever crosses it in
clear:

* A token is one line, `gmjoin1.<base64url JSON>`: the cluster id, the token id, member API
  addresses, and a join key. The join key is HMAC(cluster secret, token id), so every member
  can recompute it and none stores it; the replicated state holds only the token's id and
  expiry (`join_tokens`), which is what makes it valid.
* The newcomer proves it holds the key with an HMAC over its request (node id, addresses,
  a fresh nonce). A replayed request gains nothing: the answer is sealed.
* The member seals its answer (cluster secret, Raft members) with ChaCha20-Poly1305 under a
  key derived from the join key and both nonces; opening it also proves to the newcomer that
  it talked to a member.

Two steps, so a node is added to the Raft group only once it is up: `hello` (any member
answers: the secret and the members), the newcomer starts its Raft store, then `confirm`
(the leader adds it, one membership change at a time, and waits for the commit). A node
added before it runs would leave a one-node cluster unable to commit anything.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import os
import secrets
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

__all__ = ["JoinError", "JoinRequest", "JoinToken", "join_key", "open_reply", "parse_token",
           "seal_reply", "loopback_mismatch"]

TOKEN_PREFIX = "gmjoin1."
DEFAULT_TOKEN_TTL_S = 24 * 3600


class JoinError(Exception):
    """The join cannot go on; the message says why in words."""


@dataclass(frozen=True)
class JoinToken:
    cluster_id: str
    token_id: str
    key: bytes
    api_urls: tuple[str, ...]

    def encode(self) -> str:
        body = {"c": self.cluster_id, "t": self.token_id, "a": list(self.api_urls),
                "k": _b64(self.key)}
        return TOKEN_PREFIX + _b64(json.dumps(body, separators=(",", ":")).encode())


def join_key(cluster_secret: str, token_id: str) -> bytes:
    """The token's key: every member derives it from the cluster secret; none stores it."""
    return hmac.new(cluster_secret.encode(), f"gpumesh join v1|{token_id}".encode(),
                    hashlib.sha256).digest()


def new_token(cluster_id: str, cluster_secret: str,
              api_urls: list[str]) -> tuple[JoinToken, str]:
    token_id = secrets.token_hex(6)
    return JoinToken(cluster_id, token_id, join_key(cluster_secret, token_id),
                     tuple(api_urls)), token_id


def parse_token(text: str) -> JoinToken:
    text = text.strip()
    if not text.startswith(TOKEN_PREFIX):
        raise JoinError(f"a join token starts with {TOKEN_PREFIX!r}: run `gpumesh join-token` "
                        f"on a member and pass its whole line")
    try:
        body = json.loads(_unb64(text[len(TOKEN_PREFIX):]))
        return JoinToken(str(body["c"]), str(body["t"]), _unb64(body["k"]),
                         tuple(str(u) for u in body["a"]))
    except (ValueError, KeyError, TypeError) as exc:
        raise JoinError(f"the join token is damaged ({exc}); copy it again") from None


# --- the request -------------------------------------------------------------------------------

@dataclass(frozen=True)
class JoinRequest:
    step: str                    # "hello" or "confirm"
    cluster_id: str
    token_id: str
    node_id: str
    name: str
    raft_address: str
    api_url: str
    nonce: bytes

    def signed(self, key: bytes) -> dict[str, Any]:
        body = self._fields()
        body["proof"] = hmac.new(key, self._message(), hashlib.sha256).hexdigest()
        return body

    def verify(self, key: bytes, proof: str) -> bool:
        expected = hmac.new(key, self._message(), hashlib.sha256).hexdigest()
        return hmac.compare_digest(expected, proof)

    @classmethod
    def from_body(cls, body: Any) -> tuple["JoinRequest", str]:
        """Parse a request body; raise JoinError (a 400) on anything malformed."""
        try:
            request = cls(step=_text(body["step"]), cluster_id=_text(body["cluster_id"]),
                          token_id=_text(body["token_id"]), node_id=_text(body["node_id"]),
                          name=_text(body["name"]), raft_address=_text(body["raft_address"]),
                          api_url=_text(body["api_url"]), nonce=_unb64(_text(body["nonce"])))
            proof = _text(body["proof"])
        except (KeyError, TypeError, ValueError) as exc:
            raise JoinError(f"malformed join request: {exc}") from None
        if request.step not in ("hello", "confirm") or len(request.nonce) < 16:
            raise JoinError("malformed join request: step must be hello or confirm, with a "
                            "nonce of at least 16 bytes")
        _split_address(request.raft_address)
        return request, proof

    def _fields(self) -> dict[str, Any]:
        return {"step": self.step, "cluster_id": self.cluster_id, "token_id": self.token_id,
                "node_id": self.node_id, "name": self.name, "raft_address": self.raft_address,
                "api_url": self.api_url, "nonce": _b64(self.nonce)}

    def _message(self) -> bytes:
        return json.dumps(self._fields(), sort_keys=True, separators=(",", ":")).encode()


# --- the sealed reply --------------------------------------------------------------------------

def seal_reply(key: bytes, client_nonce: bytes, payload: dict[str, Any]) -> dict[str, str]:
    server_nonce = os.urandom(16)
    aead_nonce = os.urandom(12)
    box = ChaCha20Poly1305(_reply_key(key, client_nonce, server_nonce))
    sealed = box.encrypt(aead_nonce, json.dumps(payload).encode(), b"gpumesh join reply")
    return {"server_nonce": _b64(server_nonce), "sealed": _b64(aead_nonce + sealed)}


def open_reply(key: bytes, client_nonce: bytes, reply: dict[str, Any]) -> dict[str, Any]:
    try:
        server_nonce = _unb64(reply["server_nonce"])
        blob = _unb64(reply["sealed"])
        box = ChaCha20Poly1305(_reply_key(key, client_nonce, server_nonce))
        return json.loads(box.decrypt(blob[:12], blob[12:], b"gpumesh join reply"))
    except Exception as exc:   # InvalidTag, bad base64, bad JSON: all mean "not a member"
        raise JoinError(f"the member's answer could not be opened with this token "
                        f"({type(exc).__name__}): it is not a member of the token's cluster"
                        ) from None


def _reply_key(key: bytes, client_nonce: bytes, server_nonce: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=client_nonce + server_nonce,
                info=b"gpumesh join reply v1").derive(key)


# --- addresses ---------------------------------------------------------------------------------

def loopback_mismatch(newcomer: str, members: list[str]) -> str | None:
    """Why a Raft address cannot join these members, or None.

    A loopback address works only when every member is on the same machine: mixing it with
    real addresses gives a cluster whose members cannot reach each other.
    """
    mine = _is_loopback(newcomer)
    for member in members:
        if _is_loopback(member) != mine:
            return (f"{newcomer} is {'a loopback' if mine else 'a network'} address but member "
                    f"{member} is {'a loopback' if not mine else 'a network'} address: every "
                    f"member must reach every other; start this node with --advertise set to "
                    f"an address the others can reach")
    return None


def host_of_url(url: str) -> str:
    return urlsplit(url).hostname or ""


def _is_loopback(address: str) -> bool:
    host, _ = _split_address(address)
    return ipaddress.ip_address(host).is_loopback


def _split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    try:
        ipaddress.ip_address(host)
        number = int(port)
    except ValueError:
        raise JoinError(f"a Raft address is IP:PORT, got {address!r}") from None
    return host, number


def _text(value: Any) -> str:
    if not isinstance(value, str) or not value or len(value) > 512:
        raise TypeError(f"expected a short string, got {type(value).__name__}")
    return value


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def token_expired(record: dict[str, Any], now: float | None = None) -> bool:
    return (time.time() if now is None else now) >= float(record["expires"])
