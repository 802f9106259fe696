"""5 Keys and users: API keys (create: shown once, easy to copy; revoke; expiry) and the
users that own them."""

from __future__ import annotations

import time
import urllib.parse
from typing import Any

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.widgets import DataTable, Static

from ..client import ApiError
from ..modals import ConfirmModal, NewKeyModal, SecretModal
from ..widgets import cursor_key, row_table, sync_rows
from .base import View

__all__ = ["KeysView"]

KEY_COLUMNS = ("KEY", "NAME", "ROLE", "USER", "CREATED", "EXPIRES", "MODELS")
USER_COLUMNS = ("USER", "ROLE", "KEYS", "LIMITS")


class KeysView(View):
    MODE = "keys"
    TOPICS = frozenset({"api_keys", "users", "clock"})
    HELP_TEXT = "API keys and their users. A new key is shown once: copy it then."
    BINDINGS = [
        Binding("n", "new_key", "New key", id="keys.new"),
        Binding("x", "revoke", "Revoke", id="keys.revoke"),
        Binding("ctrl+d", "revoke", "Revoke", show=False, id="keys.delete"),
    ]

    def compose_body(self) -> ComposeResult:
        yield row_table("keys", KEY_COLUMNS)
        yield Static(id="users-note")
        yield row_table("users", USER_COLUMNS)

    def on_mount(self) -> None:
        super().on_mount()
        self.query_one("#keys", DataTable).border_title = "API keys"
        self.query_one("#users", DataTable).border_title = "users"

    @property
    def users(self) -> list[dict[str, Any]] | None:
        """The users (from the event stream), or None where the node has no users at all."""
        model = self.app.model
        return list(model.users.values()) if model.has_users else None

    def redraw(self, topics: set[str]) -> None:
        now = self.app.model.clock()
        keys = sorted(self.app.model.api_keys.values(), key=lambda k: k.get("created", 0))
        rows = self.visible((key["id"], _key_cells(key, now)) for key in keys)
        sync_rows(self.query_one("#keys", DataTable), rows)
        self._draw_users()

    def _draw_users(self) -> None:
        table = self.query_one("#users", DataTable)
        note = self.query_one("#users-note", Static)
        table.display = self.users is not None
        if self.users is None:
            note.update("no users on this node yet (an older node): keys only")
            return
        note.update("")
        counts: dict[str, int] = {}
        for key in self.app.model.api_keys.values():
            owner = key.get("user") or f"key-{key['id']}"    # the gateway's owner_of()
            counts[owner] = counts.get(owner, 0) + 1
        rows = self.visible((str(user.get("id")), _user_cells(user, counts))
                            for user in sorted(self.users, key=lambda u: u.get("id", "")))
        sync_rows(table, rows)

    # --- create and revoke -----------------------------------------------------------------

    @work(group="keys-actions", exit_on_error=False)
    async def action_new_key(self) -> None:
        users = [(str(u.get("id")), str(u.get("role", "?"))) for u in self.users or []]
        body = await self.app.push_screen_wait(NewKeyModal(users))
        if body is None:
            return
        try:
            created = await self.app.client.post("/api/keys", body)
        except ApiError as exc:
            message = ("this node has no keys API yet (POST /api/keys)" if exc.missing_route
                       else f"creating the key failed: {exc}")
            self.notify(message, severity="error", timeout=8)
            return
        await self.app.push_screen_wait(SecretModal(created.get("key", "?"),
                                                    f"API key {body['name']}"))

    @work(group="keys-actions", exit_on_error=False)
    async def action_revoke(self) -> None:
        key_id = cursor_key(self.query_one("#keys", DataTable))
        record = next((k for k in self.app.model.api_keys.values() if k["id"] == key_id), None)
        if record is None:
            return
        if not await self.app.push_screen_wait(ConfirmModal(
                f"Revoke key {key_id} ({record.get('name', '-')})? Every node refuses it "
                "from now on.", yes="Revoke", destructive=True)):
            return
        await self.call_api(
            f"revoking {key_id}", "DELETE", "/api/keys/" + urllib.parse.quote(key_id, safe=""),
            done=f"revoked {key_id}",
            missing="this node has no keys API yet (DELETE /api/keys/{id})")


def _key_cells(key: dict[str, Any], now: float) -> tuple[str, ...]:
    return (key["id"], key.get("name", "-"), key.get("role", "-"),
            key.get("user") or "-", _date(key.get("created")),
            _expiry(key.get("expires"), now),
            ",".join(key.get("models") or []) or "all")


def _user_cells(user: dict[str, Any], counts: dict[str, int]) -> tuple[str, ...]:
    limits = user.get("limits") or {}
    return (user.get("id", "-"), user.get("role", "-"),
            str(counts.get(user.get("id", ""), 0)),
            " ".join(f"{k}={v}" for k, v in sorted(limits.items())) or "-")


def _date(when: Any) -> str:
    if not isinstance(when, (int, float)):
        return "-"
    return time.strftime("%Y-%m-%d", time.localtime(when))


def _expiry(when: Any, now: float) -> str:
    if not isinstance(when, (int, float)):
        return "never"
    if when <= now:
        return "EXPIRED"
    days = (when - now) / 86400
    return f"{_date(when)} ({days:.0f}d)" if days >= 1 else f"in {(when - now) / 3600:.0f}h"
