"""Compatibility: does some node's engine serve the model's architecture?

The model's architecture is read from its headers when it is deployed (GGUF
`general.architecture`, or the first class in `config.json`'s `architectures`). Which
architectures an engine version serves is the engine's own answer, read once per version by
a node that has it (`backends/architectures.py`) and kept in the replicated state
(`engine_architectures`, commands/engines.py). The check looks at the versions the ready
nodes would run the model with: the pinned one, else each node's default. It refuses only
when every one of them has answered and none knows the architecture: a version not read yet,
an engine without a list (SGLang, custom) or an image leaves the question open.
"""

from __future__ import annotations

import difflib
from typing import Any, Iterable, Mapping

from ..commands.engines import architectures_key

__all__ = ["architecture_check"]

_SAMPLE = 5


def architecture_check(record: Mapping[str, Any], nodes: Iterable[Mapping[str, Any]],
                       table: Mapping[str, Mapping[str, Any]]) -> dict[str, Any] | None:
    """{"check": "architecture", "ok", "detail"}, or None when there is nothing to check."""
    arch = (record.get("estimate") or {}).get("architecture")
    engine = record["backend"]
    if not isinstance(arch, str) or not arch or record.get("image"):
        return None
    if record.get("format") == "safetensors" and not arch[:1].isupper():
        return None        # a model_type (no `architectures` in config.json), not a class
    versions = _versions_in_use(engine, record.get("backend_version"), nodes)
    if not versions:
        return None        # no ready node has the engine: the engine check says so
    lists = {v: table.get(architectures_key(engine, v)) if v else None for v in versions}
    serving = sorted(v for v, entry in lists.items() if entry and arch in entry["architectures"])
    if serving:
        return _check(True, f"{engine} {', '.join(serving)} serves the {arch} architecture")
    unread = sorted(v or "(the version it would install)" for v, entry in lists.items()
                    if entry is None)
    if unread:
        return _check(True, f"whether {engine} {', '.join(unread)} serves the {arch} "
                            f"architecture is not known yet (its list has not been read)")
    known = sorted({name for entry in lists.values() if entry for name in entry["architectures"]})
    close = difflib.get_close_matches(arch, known, n=3, cutoff=0.6)
    hint = (f"closest: {', '.join(close)}" if close else
            f"e.g. {', '.join(known[:_SAMPLE])}" + (" …" if len(known) > _SAMPLE else ""))
    where = "; ".join(f"{engine} {v} on {', '.join(sorted(names))}"
                      for v, names in sorted(versions.items()))
    return _check(False, f"no node's engine serves the architecture {arch!r}: {where} "
                         f"knows {len(known)} others ({hint}); deploy it with another "
                         f"--backend, or a version of {engine} that knows it")


def _versions_in_use(engine: str, pinned: str | None,
                     nodes: Iterable[Mapping[str, Any]]) -> dict[str, list[str]]:
    """Version -> the ready nodes that would run the model with it."""
    versions: dict[str, list[str]] = {}
    for node in nodes:
        if node.get("status") != "ready" or node.get("draining"):
            continue
        traits = (node.get("backends") or {}).get(engine)
        if not isinstance(traits, Mapping):
            continue
        version = str(pinned or traits.get("version") or "")    # "": installed on demand
        versions.setdefault(version, []).append(str(node.get("name") or node["id"]))
    return versions


def _check(ok: bool, detail: str) -> dict[str, Any]:
    return {"check": "architecture", "ok": ok, "detail": detail}
