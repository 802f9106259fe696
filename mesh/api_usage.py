"""`GET /api/usage`: metered usage, summed over a period and grouped.

Query: `by` = key | user | model | node, or several joined by commas (default `model,key`);
`since` and `until` as unix times
or ages (`90m`, `24h`, `7d`); filters `user`, `key`, `model`, `node`. Usage is kept by the
hour, so a period starts at the beginning of the hour `since` falls in. Rows are what the
nodes have folded into the replicated state (about a second behind the gateway).
A `user` key sees only its own user's usage.
"""

from __future__ import annotations

import re
import time
from typing import Any

from aiohttp import web

from .auth import PRINCIPAL
from .commands.usage import ROW_FIELDS
from .errors import openai_error
from .replicated import StateView
from .state import ClusterStore

__all__ = ["UsageApi", "parse_time", "usage_report"]

GROUPS = ("key", "user", "model", "node")
_AGE = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class UsageApi:
    def __init__(self, store: ClusterStore) -> None:
        self._store = store

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/api/usage", self.usage)

    async def usage(self, request: web.Request) -> web.Response:
        principal = request[PRINCIPAL]
        query = request.query
        by = tuple(query.get("by", "model,key").split(","))
        if not by or any(group not in GROUPS for group in by) or len(set(by)) != len(by):
            return openai_error(400, f"by must be one or more of {', '.join(GROUPS)}, "
                                "joined by commas", param="by")
        try:
            since = parse_time(query.get("since"), "since")
            until = parse_time(query.get("until"), "until")
        except ValueError as exc:
            return openai_error(400, str(exc), param=str(exc).split()[0])
        filters = {f: query[f] for f in GROUPS if query.get(f)}
        if not principal.is_admin:
            filters["user"] = principal.user
        return web.json_response(usage_report(self._store.view, by, since, until, filters))


def parse_time(value: str | None, name: str) -> float | None:
    """A unix time, or an age before now (`90m`, `24h`, `7d`)."""
    if value is None or value == "":
        return None
    if match := _AGE.match(value.strip()):
        return time.time() - float(match.group(1)) * _SECONDS[match.group(2)]
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"{name} must be a unix time or an age such as 90m, 24h or 7d, "
                         f"not {value!r}") from None


def usage_report(view: StateView, by: tuple[str, ...], since: float | None,
                 until: float | None, filters: dict[str, str]) -> dict[str, Any]:
    first_hour = int(since) // 3600 * 3600 if since is not None else None
    groups: dict[str, dict[str, Any]] = {}
    totals = {f: 0 for f in ROW_FIELDS}
    for hour, rows in view.usage.items():
        start = int(hour)
        if (first_hour is not None and start < first_hour) or (until is not None
                                                               and start >= until):
            continue
        for row in rows.values():
            if any(row.get(field) != wanted for field, wanted in filters.items()):
                continue
            ident = "|".join(str(row[g]) for g in by)
            group = groups.setdefault(ident, {**{g: row[g] for g in by},
                                              **{f: 0 for f in ROW_FIELDS}})
            for field in ROW_FIELDS:
                group[field] += row[field]
                totals[field] += row[field]
    if "key" in by:
        names = {k["id"]: k["name"] for k in view.api_keys.values()}
        for group in groups.values():
            group["name"] = names.get(group["key"])       # None: revoked since
    data = sorted(groups.values(), key=lambda g: (-g["requests"], *(str(g[b]) for b in by)))
    for entry in (*data, totals):
        entry["total_tokens"] = entry["prompt_tokens"] + entry["completion_tokens"]
    return {"by": ",".join(by), "since": first_hour, "until": until, "filters": filters,
            "data": data, "totals": totals}
