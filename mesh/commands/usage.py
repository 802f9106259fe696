"""Commands on `usage` (metered totals) and `rates` (each node's limit counters).

Every node meters its gateway's requests in memory and folds them in here in batches
(`fold_usage`, about once a second while it has traffic, and once more on a clean stop),
never one Raft write per request.

- `usage` holds totals by hour: `{hour start: {"node|key|model": row}}`, a row counting
  requests, errors, prompt and completion tokens of one key on one model served by one node
  (the node of the instance that answered; the gateway's own when none did). Nesting by hour keeps a fold cheap: it
  copies the (short) hour index and one hour's rows, never the whole history.
- `rates` holds, per node, its last report of the counters its limits use (requests and
  tokens in the last minute, requests in flight, per key and per user), so every node can
  add the other nodes' counts to its own (mesh/limits.py).

A batch carries its node's sequence number; a batch the state has already seen (a retry
after an unknown outcome) changes nothing, so a count is never folded twice.
"""

from __future__ import annotations

from typing import Any

from .common import Result, State

ROW_FIELDS = ("requests", "errors", "prompt_tokens", "completion_tokens")


def _fold_usage(state: State, cmd: dict[str, Any]) -> tuple[dict, Result]:
    node = str(cmd["node"])                  # the reporting node
    seq = int(cmd["seq"])
    rates = state.get("rates", {})
    if rates.get(node, {}).get("seq", -1) >= seq:
        return {}, {"ok": True, "duplicate": True}
    usage = dict(state.get("usage", {}))
    keep_after = cmd.get("keep_after")
    if keep_after is not None:
        usage = {hour: rows for hour, rows in usage.items() if int(hour) >= keep_after}
    touched: dict[str, dict[str, Any]] = {}
    for hour, served_by, key, user, model, *counts in cmd["rows"]:
        bucket = str(int(hour))
        rows = touched.get(bucket)
        if rows is None:
            rows = touched[bucket] = dict(usage.get(bucket, {}))
        row_id = f"{served_by}|{key}|{model}"
        old = rows.get(row_id) or {"hour": int(hour), "node": served_by, "key": key,
                                   "user": user, "model": model, **{f: 0 for f in ROW_FIELDS}}
        rows[row_id] = {**old, "user": user,
                        **{f: old[f] + int(n) for f, n in zip(ROW_FIELDS, counts, strict=True)}}
    usage.update(touched)
    report = cmd.get("rates") or {}
    new_rates = dict(rates)
    new_rates[node] = {"at": float(cmd["at"]), "seq": seq, "keys": dict(report.get("keys", {})),
                       "users": dict(report.get("users", {}))}
    return {"usage": usage, "rates": new_rates}, {"ok": True}


HANDLERS = {
    "fold_usage": _fold_usage,
}
