"""Source records: what a user typed (`PATH_OR_REPO`) as plain data for the replicated state.

    {"kind": "local", "path": "/abs/path/model.gguf"}
    {"kind": "huggingface", "repo": "owner/name", "file": "model-Q4_K_M.gguf" | None,
     "revision": "main"}                                   (+ "pattern" when one was given)
    {"kind": "modelscope", "repo": "owner/name", "file": None, "revision": "master", …}

Forms: `owner/name` and `hf://owner/name` (Hugging Face), `ms://owner/name` or
`modelscope://owner/name` (ModelScope); `@REV` after the repo picks a revision; `:PART`
after it picks files: a path (`:model-Q4_K_M.gguf`, `:sub/dir/model.gguf`), a glob
(`:*Q4_K_M*.gguf`), or a quantisation tag (`:Q4_K_M`, one quant of a GGUF repo).

A path that exists is local. Something that looks like a path (starts with /, ., ~) but does
not exist is an error, not a repo id: a typo must not become a download attempt.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

__all__ = ["HUBS", "SourceError", "describe_source", "parse_source", "source_key"]

HUBS = {"huggingface": "main", "modelscope": "master"}      # hub -> default revision
_PREFIXES = {"hf://": "huggingface", "huggingface://": "huggingface",
             "ms://": "modelscope", "modelscope://": "modelscope"}
_REPO = re.compile(r"^([\w.-]+/[\w.-]+)(?:@([\w.\-/]+?))?(?::([\w./*?\[\]-]+))?$")
_QUANT_TAG = re.compile(r"^[A-Za-z0-9_]+$")


class SourceError(ValueError):
    """The source cannot be used; the message says why in words."""


def parse_source(text: str, *, revision: str | None = None) -> dict[str, Any]:
    """Classify `text` as a local path or a hub repo id, and check what can be checked."""
    text = text.strip()
    if not text:
        raise SourceError("the model source is empty: give a path or a repo id (owner/name)")
    path = Path(text).expanduser()
    if path.exists():
        return {"kind": "local", "path": str(path.resolve())}
    hub, rest = "huggingface", text
    for prefix, name in _PREFIXES.items():
        if text.startswith(prefix):
            hub, rest = name, text[len(prefix):]
            break
    match = _REPO.match(rest)
    # A missing "dir/model.gguf" is a path typo, but "owner/name:model.gguf" names a repo file.
    if text.startswith(("/", ".", "~")) or (text.endswith(".gguf") and not (match and match[3])):
        raise SourceError(f"model path {text!r} does not exist")
    if match is None:
        raise SourceError(f"{text!r} is neither an existing path nor a Hugging Face or "
                          "ModelScope repo id (owner/name, optionally hf:// or ms://, "
                          "@REVISION, and :FILE, :GLOB or :QUANT)")
    source: dict[str, Any] = {"kind": hub, "repo": match[1], "file": None,
                              "revision": revision or match[2] or HUBS[hub]}
    part = match[3]
    if part:
        if any(c in part for c in "*?["):
            source["pattern"] = part
        elif "/" in part or "." in part:
            source["file"] = part
        elif _QUANT_TAG.match(part):
            source["pattern"] = f"*{part}*.gguf"        # a quantisation: one quant of a repo
    return source


def describe_source(source: dict[str, Any]) -> str:
    if source["kind"] == "local":
        return source["path"]
    scheme = "hf://" if source["kind"] == "huggingface" else "ms://"
    revision = source.get("revision")
    at = f"@{revision}" if revision and revision != HUBS.get(source["kind"]) else ""
    part = source.get("file") or source.get("pattern")
    return f"{scheme}{source['repo']}{at}" + (f":{part}" if part else "")


def source_key(source: dict[str, Any]) -> str:
    """Where a hub source lives in a node's cache, relative to the cache root:
    `huggingface/owner--name/REVISION` (one folder per repo and revision)."""
    owner, name = source["repo"].split("/", 1)
    revision = str(source.get("revision") or HUBS[source["kind"]]).replace("/", "--")
    return f"{source['kind']}/{owner}--{name}/{revision}"
