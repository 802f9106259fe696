"""Commands on the `api_keys` collection (records keyed by the SHA-256 of the key)."""

from __future__ import annotations

from typing import Any

from .common import CommandError, Result, State


def _create_api_key(state: State, cmd: dict[str, Any]) -> tuple[dict, Result]:
    # Keys are stored under their SHA-256 hash so the gateway authenticates with one lookup.
    key = dict(cmd["key"])
    keys = state["api_keys"]
    if key["hash"] in keys or any(k["id"] == key["id"] for k in keys.values()):
        raise CommandError("key_exists", f"API key {key['id']!r} exists")
    # The first-admin bootstrap is conditional: if any admin key exists, a second node (or a
    # restart racing with itself) must not mint another one.
    if cmd.get("only_if_no_admin") and any(k["role"] == "admin" for k in keys.values()):
        raise CommandError("admin_exists", "an admin API key already exists")
    new_keys = dict(keys)
    new_keys[key["hash"]] = key
    return {"api_keys": new_keys}, {"ok": True}



def _delete_api_key(state: State, cmd: dict[str, Any]) -> tuple[dict, Result]:
    keys = {h: k for h, k in state["api_keys"].items() if k["id"] != cmd["id"]}
    if len(keys) == len(state["api_keys"]):
        raise CommandError("key_not_found", f"no API key {cmd['id']!r}")
    return {"api_keys": keys}, {"ok": True}



HANDLERS = {
    "create_api_key": _create_api_key,
    "delete_api_key": _delete_api_key,
}
