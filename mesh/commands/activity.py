"""Commands that carry request activity to the leader, for on-demand (scale-to-zero) models.

Gateways do not write per request: each node remembers when it last served each model and
sends one `record_activity` per flush interval with every model it saw (`activation.py`).
A request that finds a scaled-to-zero model writes at once, with `wake`, so the leader
places an instance now; waking also clears the model's old `schedule_error`, so the
answer the waiting client gets is about this attempt, not an earlier one.
"""

from __future__ import annotations

from typing import Any

from .common import Result, State


def _record_activity(state: State, cmd: dict[str, Any]) -> tuple[dict, Result]:
    models = state["models"]
    changed: dict[str, dict[str, Any]] = {}
    for name, at in sorted(cmd["models"].items()):
        model = models.get(name)
        if model is None:
            continue                      # deleted meanwhile: nothing to remember
        updates: dict[str, Any] = {}
        if float(at) > float(model.get("last_request") or 0.0):
            updates["last_request"] = float(at)
        if cmd.get("wake") and model.get("schedule_error"):
            updates["schedule_error"] = None
        if updates:
            changed[name] = {**model, **updates}
    if not changed:
        return {}, {"ok": True, "updated": []}
    return {"models": {**models, **changed}}, {"ok": True, "updated": sorted(changed)}


HANDLERS = {
    "record_activity": _record_activity,
}
