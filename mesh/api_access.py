"""Users and API keys under /api: `/api/me`, `/api/users`, `/api/keys`.

Admins manage both. A `user` key may read `/api/me` and its own user's keys (auth.py has
the role rules). A new key is answered once, in full, and never again: the state keeps only
its hash. Revoking is a replicated delete: every node refuses the key once it has applied
it (measured in tests: well under a second on loopback).
"""

from __future__ import annotations

import re
import time
from typing import Any

from aiohttp import web

from .api_common import json_object, submit_or_error
from .auth import PRINCIPAL, ROLES, USER, new_api_key, new_user, owner_of
from .commands.users import LIMIT_FIELDS
from .errors import openai_error
from .state import ClusterStore

__all__ = ["AccessApi", "public_key"]

_USER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
_REJECTION_STATUS = {"user_exists": 409, "user_not_found": 404, "key_not_found": 404,
                     "key_exists": 409, "last_admin": 409, "last_admin_key": 409,
                     "bad_limits": 400, "bad_models": 400, "bad_role": 400}


class InvalidRequest(ValueError):
    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


class AccessApi:
    def __init__(self, store: ClusterStore) -> None:
        self._store = store

    def add_routes(self, app: web.Application) -> None:
        r = app.router
        r.add_get("/api/me", self.me)
        r.add_get("/api/users", self.list_users)
        r.add_post("/api/users", self.create_user)
        r.add_patch("/api/users/{id}", self.update_user)
        r.add_delete("/api/users/{id}", self.delete_user)
        r.add_get("/api/keys", self.list_keys)
        r.add_post("/api/keys", self.create_key)
        r.add_delete("/api/keys/{id}", self.revoke_key)

    # --- who am I --------------------------------------------------------------------------

    async def me(self, request: web.Request) -> web.Response:
        p = request[PRINCIPAL]
        return web.json_response({
            "key": {"id": p.key_id, "name": p.key_name, "expires": p.expires,
                    "models": sorted(p.models) if p.models is not None else None,
                    "limits": p.key_limits},
            "user": {"id": p.user, "role": p.role, "limits": p.user_limits}})

    # --- users -----------------------------------------------------------------------------

    async def list_users(self, request: web.Request) -> web.Response:
        view = self._store.view
        keys_of: dict[str, int] = {}
        for key in view.api_keys.values():
            keys_of[owner_of(key)] = keys_of.get(owner_of(key), 0) + 1
        users = [{**u, "keys": keys_of.get(u["id"], 0)}
                 for u in sorted(view.users.values(), key=lambda u: u["id"])]
        return web.json_response({"data": users})

    async def create_user(self, request: web.Request) -> web.Response:
        body = await json_object(request)
        if isinstance(body, web.Response):
            return body
        try:
            name = body.get("name")
            if not isinstance(name, str) or not _USER_NAME.match(name):
                raise InvalidRequest("name must be 1-64 characters: letters, digits and . _ @ -",
                                     "name")
            role = body.get("role", USER)
            if role not in ROLES:
                raise InvalidRequest(f"role must be one of {', '.join(ROLES)}", "role")
            limits = parse_limits(body.get("limits"))
        except InvalidRequest as exc:
            return openai_error(400, str(exc), param=exc.param)
        user = new_user(name, role, limits)
        result = await self._submit({"op": "create_user", "user": user})
        return result if isinstance(result, web.Response) else \
            web.json_response(result["user"], status=201)

    async def update_user(self, request: web.Request) -> web.Response:
        body = await json_object(request)
        if isinstance(body, web.Response):
            return body
        if set(body) != {"limits"}:
            return openai_error(400, "only 'limits' can be changed", param=",".join(sorted(body)))
        try:
            limits = parse_limits(body["limits"])
        except InvalidRequest as exc:
            return openai_error(400, str(exc), param=exc.param)
        result = await self._submit({"op": "update_user", "id": request.match_info["id"],
                                     "changes": {"limits": limits}})
        return result if isinstance(result, web.Response) else web.json_response(result["user"])

    async def delete_user(self, request: web.Request) -> web.Response:
        user_id = request.match_info["id"]
        result = await self._submit({"op": "delete_user", "id": user_id})
        return result if isinstance(result, web.Response) else \
            web.json_response({"deleted": user_id, "keys_removed": result["keys_removed"]})

    # --- keys ------------------------------------------------------------------------------

    async def list_keys(self, request: web.Request) -> web.Response:
        principal = request[PRINCIPAL]
        keys = [public_key(k) for k in self._store.view.api_keys.values()
                if principal.is_admin or owner_of(k) == principal.user]
        return web.json_response({"data": sorted(keys, key=lambda k: (k["user"], k["created"]))})

    async def create_key(self, request: web.Request) -> web.Response:
        principal = request[PRINCIPAL]
        body = await json_object(request)
        if isinstance(body, web.Response):
            return body
        view = self._store.view
        try:
            name = body.get("name", "key")
            if not isinstance(name, str) or not 1 <= len(name) <= 64:
                raise InvalidRequest("name must be 1-64 characters", "name")
            user_id = body.get("user", principal.user)
            user = view.users.get(user_id) if isinstance(user_id, str) else None
            if user is None:
                raise InvalidRequest(f"no user {user_id!r}; create it first (gpumesh users add)"
                                     if user_id != principal.user else
                                     "this key belongs to no user: name one with 'user'",
                                     "user")
            if body.get("role") not in (None, user["role"]):
                raise InvalidRequest(f"a key takes its user's role: {user['id']} is "
                                     f"{user['role']}; name a user with role {body['role']}",
                                     "role")
            expires = _expiry(body)
            models = body.get("models")
            if models is not None and not (isinstance(models, list) and models
                                           and all(isinstance(m, str) and m for m in models)):
                raise InvalidRequest("models must be a non-empty list of model names", "models")
            limits = parse_limits(body.get("limits"))
        except InvalidRequest as exc:
            return openai_error(400, str(exc), param=exc.param)
        key, record = new_api_key(name, user["role"], user=user["id"], expires=expires,
                                  models=models, limits=limits)
        result = await self._submit({"op": "create_api_key", "key": record})
        if isinstance(result, web.Response):
            return result
        return web.json_response({**public_key(record), "key": key}, status=201)

    async def revoke_key(self, request: web.Request) -> web.Response:
        key_id = request.match_info["id"]
        result = await self._submit({"op": "delete_api_key", "id": key_id})
        return result if isinstance(result, web.Response) else \
            web.json_response({"revoked": key_id})

    async def _submit(self, command: dict[str, Any]) -> dict[str, Any] | web.Response:
        return await submit_or_error(self._store, command, _REJECTION_STATUS)


def public_key(record: dict[str, Any]) -> dict[str, Any]:
    """A key record as the API shows it: everything but the hash."""
    return {"id": record["id"], "name": record["name"], "user": owner_of(record),
            "role": record["role"], "created": record["created"],
            "expires": record.get("expires"), "models": record.get("models"),
            "limits": record.get("limits")}


def parse_limits(value: Any) -> dict[str, int] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise InvalidRequest(f"limits must be an object with {', '.join(LIMIT_FIELDS)}",
                             "limits")
    limits: dict[str, int] = {}
    for name, number in value.items():
        if name not in LIMIT_FIELDS:
            raise InvalidRequest(f"unknown limit {name!r}; limits are "
                                 f"{', '.join(LIMIT_FIELDS)}", "limits")
        if number is None:
            continue
        if isinstance(number, bool) or not isinstance(number, int) or number <= 0:
            raise InvalidRequest(f"limit {name} must be a positive whole number", "limits")
        limits[name] = number
    return limits or None


def _expiry(body: dict[str, Any]) -> float | None:
    """`expires` (unix time), `expires_in_s` or `expires_in_days`; none of them: never."""
    if body.get("expires_in_days") is not None:
        days = body["expires_in_days"]
        if isinstance(days, bool) or not isinstance(days, (int, float)) or days <= 0:
            raise InvalidRequest("expires_in_days must be a positive number", "expires_in_days")
        return time.time() + days * 86400
    if "expires_in_s" in body and body["expires_in_s"] is not None:
        value = body["expires_in_s"]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise InvalidRequest("expires_in_s must be a positive number of seconds",
                                 "expires_in_s")
        return time.time() + value
    value = body.get("expires")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= time.time():
        raise InvalidRequest("expires must be a unix time in the future", "expires")
    return float(value)
