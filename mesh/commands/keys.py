"""Commands on the `api_keys` collection (records keyed by the SHA-256 of the key).

A key record: `id`, `hash`, `name`, `role` (used only when it belongs to no known user),
`created`, and optionally `user`, `expires` (unix time), `models` (allowed model names) and
`limits`. Revoking deletes the record: every node stops accepting the key as soon as it
applies the command.
"""

from __future__ import annotations

from typing import Any

from .common import CommandError, Result, State
from .users import ROLES, check_limits


def _is_admin_key(key: dict[str, Any], users: dict[str, dict[str, Any]]) -> bool:
    user = users.get(key.get("user") or "")
    return (user["role"] if user is not None else key["role"]) == "admin"


def _create_api_key(state: State, cmd: dict[str, Any]) -> tuple[dict, Result]:
    # Keys are stored under their SHA-256 hash so the gateway authenticates with one lookup.
    key = dict(cmd["key"])
    keys = state["api_keys"]
    users = state.get("users", {})
    if key["hash"] in keys or any(k["id"] == key["id"] for k in keys.values()):
        raise CommandError("key_exists", f"API key {key['id']!r} exists")
    if key["role"] not in ROLES:
        raise CommandError("bad_role", f"role must be one of {', '.join(ROLES)}")
    # The first-admin bootstrap is conditional: if any admin key exists, a second node (or a
    # restart racing with itself) must not mint another one.
    if cmd.get("only_if_no_admin") and any(_is_admin_key(k, users) for k in keys.values()):
        raise CommandError("admin_exists", "an admin API key already exists")
    changes: dict[str, Any] = {}
    owner = key.get("user")
    if owner is not None and owner not in users:
        # The bootstrap names its user in the same command; anyone else needs one that exists.
        new_user = cmd.get("create_user")
        if new_user is None or new_user["id"] != owner:
            raise CommandError("user_not_found", f"no user {owner!r}")
        changes["users"] = {**users, owner: dict(new_user)}
    check_limits(key.get("limits"))
    models = key.get("models")
    if models is not None and not (isinstance(models, list)
                                   and all(isinstance(m, str) for m in models)):
        raise CommandError("bad_models", "models must be a list of model names")
    new_keys = dict(keys)
    new_keys[key["hash"]] = key
    changes["api_keys"] = new_keys
    return changes, {"ok": True}


def _delete_api_key(state: State, cmd: dict[str, Any]) -> tuple[dict, Result]:
    users = state.get("users", {})
    doomed = [k for k in state["api_keys"].values() if k["id"] == cmd["id"]]
    if not doomed:
        raise CommandError("key_not_found", f"no API key {cmd['id']!r}")
    owner = cmd.get("user")
    if owner is not None and doomed[0].get("user") != owner:
        raise CommandError("key_not_found", f"no API key {cmd['id']!r} of user {owner!r}")
    keys = {h: k for h, k in state["api_keys"].items() if k["id"] != cmd["id"]}
    if _is_admin_key(doomed[0], users) and not any(_is_admin_key(k, users)
                                                   for k in keys.values()):
        raise CommandError("last_admin_key", f"{cmd['id']!r} is the last admin key; create "
                           "another admin key first")
    return {"api_keys": keys}, {"ok": True}


HANDLERS = {
    "create_api_key": _create_api_key,
    "delete_api_key": _delete_api_key,
}
