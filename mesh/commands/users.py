"""Commands on the `users` collection: people (or services) that own API keys.

A user's role (`admin` or `user`) is the role of every key it owns. Removing a user removes
its keys in the same command, so no key outlives its owner on any node. The last admin user
cannot be removed: the cluster would have nobody left to manage it.
"""

from __future__ import annotations

from typing import Any

from .common import CommandError, Result, State, refuse_identity_changes

ROLES = ("admin", "user")
LIMIT_FIELDS = ("rpm", "tpm", "concurrency")


def check_limits(limits: Any) -> None:
    """Limits are {rpm, tpm, concurrency} with positive whole numbers (or absent)."""
    if limits is None:
        return
    if not isinstance(limits, dict) or set(limits) - set(LIMIT_FIELDS):
        raise CommandError("bad_limits", f"limits take only {', '.join(LIMIT_FIELDS)}")
    for name, value in limits.items():
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise CommandError("bad_limits", f"limit {name} must be a positive whole number")


def _create_user(state: State, cmd: dict[str, Any]) -> tuple[dict, Result]:
    user = dict(cmd["user"])
    users = state.get("users", {})
    if user["id"] in users:
        raise CommandError("user_exists", f"a user named {user['id']!r} already exists")
    if user["role"] not in ROLES:
        raise CommandError("bad_role", f"role must be one of {', '.join(ROLES)}")
    check_limits(user.get("limits"))
    new_users = dict(users)
    new_users[user["id"]] = user
    return {"users": new_users}, {"ok": True, "user": user}


def _update_user(state: State, cmd: dict[str, Any]) -> tuple[dict, Result]:
    users = state.get("users", {})
    current = users.get(cmd["id"])
    if current is None:
        raise CommandError("user_not_found", f"no user {cmd['id']!r}")
    changes = cmd["changes"]
    refuse_identity_changes(changes, ("id", "name", "role", "created"))
    check_limits(changes.get("limits"))
    new_users = dict(users)
    new_users[cmd["id"]] = {**current, **changes}
    return {"users": new_users}, {"ok": True, "user": new_users[cmd["id"]]}


def _delete_user(state: State, cmd: dict[str, Any]) -> tuple[dict, Result]:
    users = state.get("users", {})
    user = users.get(cmd["id"])
    if user is None:
        raise CommandError("user_not_found", f"no user {cmd['id']!r}")
    if user["role"] == "admin" and not any(u["role"] == "admin" for u in users.values()
                                           if u["id"] != user["id"]):
        raise CommandError("last_admin", f"{user['id']!r} is the last admin user")
    new_users = {k: v for k, v in users.items() if k != user["id"]}
    keys = {h: k for h, k in state["api_keys"].items() if k.get("user") != user["id"]}
    return ({"users": new_users, "api_keys": keys},
            {"ok": True, "keys_removed": len(state["api_keys"]) - len(keys)})


HANDLERS = {
    "create_user": _create_user,
    "update_user": _update_user,
    "delete_user": _delete_user,
}
