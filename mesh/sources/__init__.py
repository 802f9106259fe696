"""Model sources: local paths, Hugging Face and ModelScope repos, and the node's cache.

- `spec`: what a user typed, as a source record (`parse_source`, `describe_source`).
- `hubs`: the two hubs' HTTP file APIs (listings with sizes and checksums, byte ranges).
- `select`: which of a repo's files a model needs (one quant of a GGUF repo …).
- `remote`: a remote model's facts from its headers (for the estimate, before download).
- `cache` / `download`: the node's cache, resumable checked downloads, progress (`progress`).
- `routes` / `reporter`: the API (`/api/downloads`, `/api/cache`) and download progress in
  instance records.

`fetch_source` is the one entry point at run time (blocking: call it from a thread).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .cache import ModelCache
from .download import download_selection
from .hubs import hub_for, is_offline
from .remote import remote_facts, remote_selection
from .spec import HUBS, SourceError, describe_source, parse_source, source_key

__all__ = ["HUBS", "ModelCache", "SourceError", "describe_source", "fetch_source",
           "parse_source", "remote_facts", "source_key"]


def fetch_source(source: dict[str, Any], cache_dir: Path) -> Path:
    """Blocking: make the model's files present on this node and return the path to load
    (the GGUF file, or the safetensors folder). Raises SourceError with a reason to act on.

    One download per repo folder at a time on a node: a second instance waits for the lock,
    then finds the files there. What is complete is used without asking the hub, so an
    offline node serves whatever its cache holds.
    """
    if source["kind"] == "local":
        path = Path(source["path"])
        if not path.exists():
            raise SourceError(f"model path {path} does not exist on this node")
        return path
    if source["kind"] not in HUBS:
        raise SourceError(f"unknown model source kind {source['kind']!r}")
    cache = ModelCache(cache_dir)
    folder = cache.folder(source)
    with cache.locked(folder):
        cached = cache.cached_entry(folder, source)
        if cached is not None:
            return cached
        if is_offline(source["kind"]):
            raise SourceError(f"this node is offline (GPUMESH_OFFLINE or HF_HUB_OFFLINE) and "
                              f"its cache lacks {describe_source(source)}")
        hub, selection = remote_selection(source)
        download_selection(hub, source, selection, folder)
        cache.record(folder, source, selection)
    return folder / selection.entry if selection.entry else folder
