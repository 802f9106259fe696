"""Commands on `engine_architectures`: which model architectures each engine version serves.

One entry per engine version ("ENGINE==VERSION"), not per node: the lists run to
thousands of names (transformers), and every node with that version would report the same
one. A node that has a version nobody described yet reads the list from the engine
(`backends/architectures.py`) and writes it; a write that changes nothing changes nothing.
Deploys and dry runs read it to refuse an architecture no node's engine serves.
"""

from __future__ import annotations

from typing import Any

from .common import CommandError, Result, State

__all__ = ["HANDLERS", "architectures_key"]

_MAX_NAMES = 20_000


def architectures_key(engine: str, version: str) -> str:
    return f"{engine}=={version}"


def _set_engine_architectures(state: State, cmd: dict[str, Any]) -> tuple[dict, Result]:
    engine, version = str(cmd["engine"]), str(cmd["version"])
    names = sorted({str(name) for name in cmd["architectures"]})
    if not engine or not version or len(names) > _MAX_NAMES:
        raise CommandError("bad_architectures", "an engine, its version and at most "
                           f"{_MAX_NAMES} architecture names are needed")
    key = architectures_key(engine, version)
    table = state.get("engine_architectures") or {}
    current = table.get(key)
    if current is not None and current["architectures"] == names:
        return {}, {"ok": True, "changed": False}
    record = {"engine": engine, "version": version, "architectures": names,
              "source": str(cmd.get("source") or ""), "node_id": cmd.get("node_id"),
              "at": cmd.get("at")}
    return {"engine_architectures": {**table, key: record}}, {"ok": True, "changed": True}


HANDLERS = {
    "set_engine_architectures": _set_engine_architectures,
}
