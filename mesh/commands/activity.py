"""Commands that carry request activity to the leader, for on-demand (scale-to-zero) models.

Gateways do not write per request: each node remembers when it last served each model and
sends one `record_activity` per flush interval with every model it saw (`activation.py`).
A request that finds a scaled-to-zero model writes at once, with `wake`, so the leader
places an instance now; waking also clears the model's old `schedule_error`, so the
answer the waiting client gets is about this attempt, not an earlier one.

With `node_id`, `busy` lists the models the node has requests in flight for: each gets
`busy[node_id] = at` (refreshed every flush while it lasts), and the node's mark is removed
from every other model. The leader keeps a busy model's instances (scheduler/demand.py).
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
    if cmd.get("node_id"):
        _mark_busy(models, changed, str(cmd["node_id"]), set(cmd.get("busy") or ()),
                   float(cmd.get("at") or 0.0))
    if not changed:
        return {}, {"ok": True, "updated": []}
    return {"models": {**models, **changed}}, {"ok": True, "updated": sorted(changed)}


def _mark_busy(models: dict[str, dict[str, Any]], changed: dict[str, dict[str, Any]],
               node_id: str, busy: set[str], at: float) -> None:
    """This node's busy mark on the models in `busy` (time `at`), and off every other."""
    for name, model in models.items():
        current = changed.get(name, model)
        marks = current.get("busy") or {}
        if name in busy:
            if marks.get(node_id) != at:
                changed[name] = {**current, "busy": {**marks, node_id: at}}
        elif node_id in marks:
            changed[name] = {**current, "busy": {k: v for k, v in marks.items()
                                                 if k != node_id}}


HANDLERS = {
    "record_activity": _record_activity,
}
