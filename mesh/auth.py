"""Who is calling: API keys, users and roles, and the one auth check for /v1 and /api.

Keys look like `gm-<id>-<secret>`: the id lets people name a key (`gpumesh keys revoke ID`)
without holding it, and the secret carries 256 bits. Only the SHA-256 of the whole key is
replicated: for random keys of that strength a fast hash is safe (there is nothing to
brute-force), and it lets every node check a key with one dict lookup on the hot path.

A key belongs to a user; the user's role (`admin` or `user`) is the key's role. A key may
expire and may be limited to some models; keys and users may carry rate limits. The
auth check (run by the node's one middleware, before every handler) turns the caller's
key into a `Principal` (cached per state version, so the hot
path is a hash and two dict lookups) and puts it on the request under `PRINCIPAL`: routes,
limits and metering all read that one object.

Role rules for /api: everything is admin-only, except what a user may read about
themselves: `GET /api/me`, `GET /api/keys` (their own keys) and `GET /api/usage` (their own
usage). /v1 takes any valid key. `/api/health` and `/metrics` take none.

Gateways of one cluster call each other for instances on the other node. Such a call
carries no client key: it carries `X-Gpumesh-Forward`, signed for that one request with a
key derived from the cluster secret, and is served as the `NODE` principal (the calling
gateway has already authenticated, limited and metered it) on the gateway's routes only,
never on /api. The API may be plain HTTP, so what crosses it must be worth nothing to
whoever reads it: the signature covers the time, the path, the pinned instance and a digest
of the body (checked by the gateway once it has read the body), so a header seen on the
wire authorises only that same request, and only for `FORWARD_WINDOW_S`. Engines get their own per-instance key (`engine_key`), derived
from a node-local secret, so it never needs replicating and nothing else can call them.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from typing import Any, Callable

from aiohttp import web

from .errors import openai_error

__all__ = ["ADMIN", "FORWARD_HEADER", "NODE_ROLE", "PRINCIPAL", "Authenticator", "Principal",
           "ROLES", "USER", "FORWARDED_BODY", "FORWARD_WINDOW_S", "INSTANCE_HEADER", "body_digest",
           "check_forward", "engine_key", "forward_key", "sign_forward", "hash_key",
           "key_from_request",
           "new_api_key", "new_user"]

ADMIN = "admin"
USER = "user"
ROLES = (ADMIN, USER)
NODE_ROLE = "node"            # another gateway of this cluster, never a stored role
FORWARD_HEADER = "X-Gpumesh-Forward"
INSTANCE_HEADER = "X-Gpumesh-Instance"   # the instance a forwarded request is for

# Paths that need no key: liveness checks and Prometheus scrapes (which carry no key and
# whose figures name no key or user).
OPEN_PATHS = frozenset({"/api/health", "/metrics", "/api/join"})   # join: a newcomer
# proves a join token instead (cluster_api.py)
# What a `user` key may do under /api: read about itself.
USER_API_READS = frozenset({"/api/me", "/api/keys", "/api/usage"})
_KEY_MAX_CHARS = 256
_CACHE_MAX = 100_000
_GUARDED = ("/v1/", "/api/", "/v2/", "/rerank")   # the gateway's and the API's routes


@dataclass(frozen=True, slots=True)
class Principal:
    """The caller of one request, as every part of the node sees it."""

    key_id: str
    key_name: str
    user: str
    role: str
    models: frozenset[str] | None          # None: every model
    expires: float | None                  # unix time; None: never
    key_limits: dict[str, int] | None      # {"rpm", "tpm", "concurrency"}: any subset
    user_limits: dict[str, int] | None

    @property
    def is_admin(self) -> bool:
        return self.role == ADMIN

    @property
    def is_node(self) -> bool:
        return self.role == NODE_ROLE

    @property
    def limited(self) -> bool:
        return bool(self.key_limits or self.user_limits)

    def may_use(self, model: str) -> bool:
        return self.models is None or model in self.models


NODE = Principal(key_id="-", key_name="-", user="-", role=NODE_ROLE, models=None,
                 expires=None, key_limits=None, user_limits=None)

PRINCIPAL = web.RequestKey("gpumesh_principal", Principal)
# The body digest a forwarded request was signed for (set with the NODE principal).
FORWARDED_BODY = web.RequestKey("gpumesh_forwarded_body", str)


# --- keys and users as records ---------------------------------------------------------------

def new_api_key(name: str, role: str, *, user: str | None = None,
                expires: float | None = None, models: list[str] | None = None,
                limits: dict[str, int] | None = None) -> tuple[str, dict[str, Any]]:
    """A fresh key and the record to replicate (which never holds the key itself).

    `role` is what the key is worth when it belongs to no known user (keys made before users
    existed); a key of a user takes the user's role.
    """
    key_id = secrets.token_hex(4)
    key = f"gm-{key_id}-{secrets.token_urlsafe(32)}"
    record: dict[str, Any] = {"id": key_id, "hash": hash_key(key), "name": name, "role": role,
                              "created": time.time()}
    for field, value in (("user", user), ("expires", expires), ("models", models),
                         ("limits", limits)):
        if value is not None:
            record[field] = value
    return key, record


def new_user(name: str, role: str, limits: dict[str, int] | None = None) -> dict[str, Any]:
    record: dict[str, Any] = {"id": name, "name": name, "role": role, "created": time.time()}
    if limits:
        record["limits"] = limits
    return record


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def key_from_request(request: web.Request) -> str | None:
    """The bearer token, from `Authorization: Bearer …` (OpenAI clients) or `X-API-Key`."""
    return _bearer(request.headers.get("Authorization", "")) or \
        request.headers.get("X-API-Key") or None


def _bearer(header: str) -> str | None:
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return None


def engine_key(node_secret: bytes, instance_id: str) -> str:
    """The key an instance's engine checks: only this node's gateway can compute it."""
    return hmac.new(node_secret, b"engine:" + instance_id.encode(), hashlib.sha256).hexdigest()


def forward_key(cluster_secret: str) -> bytes:
    """The key gateways of one cluster sign forwarded requests with."""
    return hmac.new(cluster_secret.encode(), b"gpumesh-gateway-forward v2",
                    hashlib.sha256).digest()


def body_digest(body: bytes) -> str:
    return hashlib.blake2b(body, digest_size=16).hexdigest()


def sign_forward(key: bytes, path: str, instance: str, body: bytes,
                 now: float | None = None) -> str:
    """The `X-Gpumesh-Forward` value for one request: `v2 TIME DIGEST SIGNATURE`."""
    stamp = int(time.time() if now is None else now)
    digest = body_digest(body)
    return f"v2 {stamp} {digest} {_forward_signature(key, stamp, path, instance, digest)}"


def check_forward(key: bytes, value: str, path: str, instance: str,
                  now: float | None = None) -> str | None:
    """The body digest a forwarded request was signed for, or None if the signature does not
    hold (wrong key, another path or instance, outside the time window)."""
    parts = value.split(" ")
    if len(parts) != 4 or parts[0] != "v2" or not parts[1].isdigit():
        return None
    stamp, digest, signature = int(parts[1]), parts[2], parts[3]
    if abs((time.time() if now is None else now) - stamp) > FORWARD_WINDOW_S:
        return None
    expected = _forward_signature(key, stamp, path, instance, digest)
    if not hmac.compare_digest(signature.encode("utf-8", "replace"), expected.encode()):
        return None
    return digest


# How long a signed forward stays good, either way of "now" (clocks assumed NTP-close;
# limits.py assumes the same).
FORWARD_WINDOW_S = 300


def _forward_signature(key: bytes, stamp: int, path: str, instance: str, digest: str) -> str:
    message = f"{stamp}|{path}|{instance}|{digest}".encode("utf-8", "surrogateescape")
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def owner_of(record: dict[str, Any]) -> str:
    """The user a key belongs to; a key made before users existed is its own user."""
    return record.get("user") or f"key-{record['id']}"


def principal_of(record: dict[str, Any], users: dict[str, dict[str, Any]]) -> Principal:
    """The Principal a stored key stands for (its user's role wins over the key's own)."""
    user_id = owner_of(record)
    user = users.get(user_id)
    models = record.get("models")
    return Principal(
        key_id=record["id"], key_name=record["name"], user=user_id,
        role=user["role"] if user is not None else record["role"],
        models=frozenset(models) if models is not None else None,
        expires=record.get("expires"),
        key_limits=record.get("limits") or None,
        user_limits=(user or {}).get("limits") or None)


# --- the auth check ---------------------------------------------------------------------------


class Authenticator:
    """The auth check of a node (run by its one middleware), with its per-state-version
    cache of principals."""

    def __init__(self, view: Callable[[], Any], cluster_secret: str) -> None:
        self._view = view
        self._forward_key = forward_key(cluster_secret)
        self._keys: Any = None                      # the api_keys dict the cache was built on
        self._users: Any = None
        # key → Principal (None: no such key), for the keys seen since keys or users last
        # changed. In this process's memory only, as the keys of requests in flight are.
        self._cache: dict[str, Principal | None] = {}
        # The same for whole `Authorization` headers that held a valid key: the usual
        # request's lookup is one dict hit, no parsing.
        self._by_header: dict[str, Principal] = {}

    def principal_for(self, key: str) -> Principal | None:
        self._follow_state()
        try:
            return self._cache[key]
        except KeyError:
            record = self._keys.get(hash_key(key))
            principal = principal_of(record, self._users) if record is not None else None
            if len(self._cache) < _CACHE_MAX:       # unknown keys must not grow it forever
                self._cache[key] = principal
            return principal

    def _follow_state(self) -> None:
        view = self._view()
        keys, users = view.api_keys, view.users
        if keys is not self._keys or users is not self._users:
            # Copy-on-write state: a new dict means keys or users changed; rebuild lazily.
            self._keys, self._users, self._cache, self._by_header = keys, users, {}, {}

    def admit(self, request: web.Request) -> web.Response | None:
        """Put the caller's `Principal` on the request, or return the error to answer.

        Synchronous: the node's one middleware (errors.error_middleware_with) runs it
        before the handler, so auth adds no coroutine layer to every request."""
        path = request.path
        if path in OPEN_PATHS or not path.startswith(_GUARDED):
            return None
        forwarded = request.headers.get(FORWARD_HEADER)
        if forwarded is not None:
            digest = check_forward(self._forward_key, forwarded, path,
                                   request.headers.get(INSTANCE_HEADER, ""))
            if digest is None:
                return openai_error(401, "invalid gateway forward signature (another cluster, "
                                    "another request's, or clocks more than "
                                    f"{FORWARD_WINDOW_S} s apart)", code="invalid_api_key")
            if path.startswith("/api/"):
                return openai_error(403, "a gateway's forward is for the gateway's routes, "
                                    "not the management API", type_="permission_error",
                                    code="forbidden")
            request[PRINCIPAL] = NODE
            request[FORWARDED_BODY] = digest      # the gateway checks the body against it
            return None
        principal = self._check_key(request)
        if type(principal) is not Principal:     # (isinstance of a Response: an ABC check)
            return principal
        if path.startswith("/api/") and not principal.is_admin:
            if not (request.method == "GET" and path in USER_API_READS):
                return openai_error(403, "this API key may not manage the cluster "
                                    "(admin only)", type_="permission_error", code="forbidden")
        request[PRINCIPAL] = principal
        return None

    def _check_key(self, request: web.Request) -> Principal | web.Response:
        self._follow_state()
        header = request.headers.get("Authorization")
        principal = self._by_header.get(header) if header is not None else None
        if principal is None:
            principal = self._check_new_key(request)
            if type(principal) is not Principal:
                return principal
            if (header is not None and key_from_request(request) == _bearer(header)
                    and len(self._by_header) < _CACHE_MAX):
                self._by_header[header] = principal
        if principal.expires is not None and principal.expires <= time.time():
            return openai_error(401, f"This API key ({principal.key_id}) expired at "
                                f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(principal.expires))}.",
                                code="invalid_api_key")
        return principal

    def _check_new_key(self, request: web.Request) -> Principal | web.Response:
        key = key_from_request(request)
        if key is None:
            return openai_error(401, "You didn't provide an API key. Pass it as "
                                "'Authorization: Bearer KEY'.", code="invalid_api_key")
        # Header bytes that are not UTF-8 arrive as surrogates: no key looks like that.
        if len(key) > _KEY_MAX_CHARS or not key.isascii() or not key.isprintable():
            return openai_error(401, "Incorrect API key provided.", code="invalid_api_key")
        principal = self.principal_for(key)
        if principal is None:
            return openai_error(401, "Incorrect API key provided.", code="invalid_api_key")
        return principal
