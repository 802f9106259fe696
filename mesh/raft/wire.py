"""The Raft port's wire, as plain functions (the transport and a test client use them):
bounded frames, a handshake that proves the cluster secret, and AEAD after it.

* Frames: a 4-byte big-endian length (`HEADER`), checked the moment it arrives — at most
  `PREAUTH_MAX_FRAME` bytes before authentication, `MAX_FRAME` after — then the body.
* Handshake (plain msgpack, tiny frames), K derived from the cluster secret with HKDF:
    dialer   → HELLO      [version, nonce_c, dialer's address]
    listener → CHALLENGE  [nonce_s, HMAC(K, "server" | nonce_c | nonce_s | addresses)]
    dialer   → PROOF      [HMAC(K, "client" | nonce_c | nonce_s | addresses)]
    listener → WELCOME    (the first encrypted frame), only if the dialer is a member.
  Each side proves it holds the secret for this connection's fresh nonces; a wrong secret
  never gets past PROOF. `ClientHandshake` is the dialer's side; the listener's is in
  `connection.GmConnection`.
* After it: ChaCha20-Poly1305 per frame (`FrameCipher`), one key per direction (HKDF over
  both nonces), the frame counter as the nonce, the length header as associated data. A
  replayed, reordered, cut or altered frame fails authentication.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from . import codec

__all__ = ["ClientHandshake", "FrameCipher", "HEADER", "MAX_FRAME", "MIN_SECRET_LENGTH",
           "NONCE_SIZE", "PREAUTH_MAX_FRAME", "TAG", "VERSION", "cluster_key", "frame", "mac",
           "session_keys"]

VERSION = b"gm-raft-1"
MIN_SECRET_LENGTH = 16
PREAUTH_MAX_FRAME = 256
MAX_FRAME = 8 << 20                  # ≥ pysyncobj's 64 KiB batch + the 1 MiB command cap
NONCE_SIZE = 32
HEADER = struct.Struct(">I")
TAG = 16


def cluster_key(secret: str) -> bytes:
    return _hkdf(secret.encode(), b"gpumesh raft cluster key", b"")


def _hkdf(material: bytes, info: bytes, salt: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt or None,
                info=info).derive(material)


def mac(key: bytes, role: bytes, nonce_c: bytes, nonce_s: bytes, client: str,
         server: str) -> bytes:
    data = b"|".join([VERSION, role, nonce_c, nonce_s, client.encode(), server.encode()])
    return hmac.new(key, data, hashlib.sha256).digest()


def frame(body: bytes) -> bytes:
    return HEADER.pack(len(body)) + body


class FrameCipher:
    """One direction of an authenticated session: ChaCha20-Poly1305, counter nonces."""

    def __init__(self, key: bytes) -> None:
        self._aead = ChaCha20Poly1305(key)
        self._counter = 0

    def seal(self, plaintext: bytes) -> bytes:
        header = HEADER.pack(len(plaintext) + TAG)
        sealed = self._aead.encrypt(self._nonce(), plaintext, header)
        return header + sealed

    def open(self, body: bytes) -> bytes:
        """Raises InvalidTag for anything not sealed by the peer as the next frame."""
        return self._aead.decrypt(self._nonce(), body, HEADER.pack(len(body)))

    def _nonce(self) -> bytes:
        nonce = self._counter.to_bytes(12, "little")
        self._counter += 1
        return nonce


def session_keys(key: bytes, nonce_c: bytes, nonce_s: bytes) -> tuple[bytes, bytes]:
    """(client→server key, server→client key)."""
    salt = nonce_c + nonce_s
    return _hkdf(key, b"gpumesh raft c2s", salt), _hkdf(key, b"gpumesh raft s2c", salt)


class ClientHandshake:
    """The dialer's side, step by step: hello() → on_challenge() → PROOF, ciphers."""

    def __init__(self, key: bytes, client: str, server: str) -> None:
        self.key, self.client, self.server = key, client, server
        self.nonce = os.urandom(NONCE_SIZE)

    def hello(self) -> bytes:
        return codec.dumps([VERSION, self.nonce, self.client])

    def on_challenge(self, body: bytes) -> tuple[bytes, FrameCipher, FrameCipher]:
        """Check the listener's proof; return (PROOF body, sending cipher, receiving cipher).
        Raises ValueError if the listener does not hold the secret."""
        message = codec.loads(body)
        if not (isinstance(message, list) and len(message) == 2
                and all(isinstance(m, bytes) for m in message) and len(message[0]) == NONCE_SIZE):
            raise ValueError("malformed challenge")
        nonce_s, proof = message
        expected = mac(self.key, b"server", self.nonce, nonce_s, self.client, self.server)
        if not hmac.compare_digest(proof, expected):
            raise ValueError("the listener does not hold the cluster secret")
        c2s, s2c = session_keys(self.key, self.nonce, nonce_s)
        mine = mac(self.key, b"client", self.nonce, nonce_s, self.client, self.server)
        return codec.dumps([mine]), FrameCipher(c2s), FrameCipher(s2c)
