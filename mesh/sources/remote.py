"""A remote model's facts from its headers alone: byte ranges, never the weights.

- GGUF: the first few MiB of the (first) model file hold the metadata and tensor infos; if
  the vocabulary makes the header longer, the range grows until it fits (at most 64 MiB).
- safetensors: `config.json`, then per weight file its 8-byte header length and its JSON
  header (a few KB): parameters and dtype without a tensor read.
Both hubs list file sizes, so the weights' bytes need no download either.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from gpumesh.modelfiles import ModelFacts, ModelFileError, gguf_facts, safetensors_facts
from gpumesh.modelfiles.facts import parse_safetensors_header
from gpumesh.modelfiles.gguf import GGUFTruncated, parse_gguf_header

from .hubs import Hub, hub_for
from .select import Selection, select_files
from .spec import SourceError

__all__ = ["read_small", "remote_facts", "remote_selection"]

_GGUF_FIRST_READ = 4 << 20
_GGUF_MOST = 64 << 20
_SMALL_FILE_MOST = 16 << 20
_PARALLEL_HEADERS = 8


def remote_selection(source: dict[str, Any], hub: Hub | None = None) -> tuple[Hub, Selection]:
    hub = hub or hub_for(source["kind"])
    listing = hub.list_files(source["repo"], source["revision"])
    return hub, select_files(source, listing, lambda path: read_small(hub, source, path))


def remote_facts(source: dict[str, Any]) -> ModelFacts:
    """Blocking: facts of a hub model from its headers. When the files are listed but their
    headers cannot be parsed, facts with the sizes alone (`n_layer == 0`)."""
    hub, selection = remote_selection(source)
    weights = sum(f.size for f in selection.weight_files())
    try:
        if selection.format == "gguf":
            return _gguf(hub, source, selection, weights)
        return _safetensors(hub, source, selection, weights)
    except ModelFileError:
        return ModelFacts(format=selection.format, architecture=None, weights_bytes=weights,
                          host_only_bytes=0, parameters=None, dtype=None, trained_context=None,
                          n_layer=0, n_embd=0, n_ff=0, n_vocab=0, n_head=0,
                          kv_bytes_per_token=0, kv_dtype_bytes=2)


def read_small(hub: Hub, source: dict[str, Any], path: str) -> bytes:
    stream, _, _ = hub.open_file(source["repo"], source["revision"], path)
    with stream:
        data = stream.read(_SMALL_FILE_MOST + 1)
    if len(data) > _SMALL_FILE_MOST:
        raise SourceError(f"{source['repo']}/{path} is larger than {_SMALL_FILE_MOST >> 20} MiB")
    return data


def _gguf(hub: Hub, source: dict[str, Any], selection: Selection, weights: int) -> ModelFacts:
    entry = next(f for f in selection.files if f.path == selection.entry)
    want = min(_GGUF_FIRST_READ, entry.size or _GGUF_FIRST_READ)
    while True:
        prefix = hub.read_range(source["repo"], source["revision"], entry.path, 0, want)
        try:
            header = parse_gguf_header(prefix, f"{source['repo']}/{entry.path}")
            break
        except GGUFTruncated as exc:
            if len(prefix) < want or want >= min(_GGUF_MOST, entry.size or _GGUF_MOST):
                raise ModelFileError(str(exc)) from None
            want = min(exc.needed, _GGUF_MOST, entry.size or _GGUF_MOST)
    return gguf_facts(header, entry.size, weights, f"{source['repo']}/{entry.path}")


def _safetensors(hub: Hub, source: dict[str, Any], selection: Selection,
                 weights: int) -> ModelFacts:
    try:
        config = json.loads(read_small(hub, source, "config.json"))
    except ValueError:
        raise ModelFileError(f"{source['repo']}/config.json is not valid JSON") from None

    def header(path: str) -> dict[str, object]:
        first8 = hub.read_range(source["repo"], source["revision"], path, 0, 8)
        return parse_safetensors_header(
            first8, lambda n: hub.read_range(source["repo"], source["revision"], path, 8, n),
            f"{source['repo']}/{path}")

    paths = [f.path for f in selection.weight_files()]
    with ThreadPoolExecutor(max_workers=min(_PARALLEL_HEADERS, len(paths))) as pool:
        headers = list(pool.map(header, paths))
    if not isinstance(config, dict):
        raise ModelFileError(f"{source['repo']}/config.json should hold a JSON object")
    return safetensors_facts(config, headers, weights, source["repo"])
