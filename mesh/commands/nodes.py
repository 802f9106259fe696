"""Commands on the `nodes` collection: the records nodes keep of themselves."""

from __future__ import annotations

from typing import Any

from .common import Result, State


def _upsert_node(state: State, cmd: dict[str, Any]) -> tuple[dict, Result]:
    node = dict(cmd["node"])
    nodes = dict(state["nodes"])
    previous = nodes.get(node["id"], {})
    nodes[node["id"]] = {**previous, **node}
    return {"nodes": nodes}, {"ok": True}



HANDLERS = {
    "upsert_node": _upsert_node,
}
