"""Commands on the `join_tokens` collection: which join tokens are valid, and until when.

Only the id and expiry are replicated. The token's key is derived from the cluster secret
(`joining.join_key`), so the state holds nothing a newcomer could join with.
"""

from __future__ import annotations

from typing import Any

from .common import CommandError, Result, State


def _create_join_token(state: State, cmd: dict[str, Any]) -> tuple[dict, Result]:
    token = dict(cmd["token"])
    tokens = state.get("join_tokens", {})
    if token["id"] in tokens:
        raise CommandError("token_exists", f"join token {token['id']!r} exists")
    # Expired tokens are dropped here, with the submitter's clock: deterministic on replay.
    kept = {k: v for k, v in tokens.items() if v["expires"] > token["created"]}
    kept[token["id"]] = token
    return {"join_tokens": kept}, {"ok": True}


def _delete_join_token(state: State, cmd: dict[str, Any]) -> tuple[dict, Result]:
    tokens = state.get("join_tokens", {})
    if cmd["id"] not in tokens:
        raise CommandError("token_not_found", f"no join token {cmd['id']!r}")
    return {"join_tokens": {k: v for k, v in tokens.items() if k != cmd["id"]}}, {"ok": True}


HANDLERS = {
    "create_join_token": _create_join_token,
    "delete_join_token": _delete_join_token,
}
