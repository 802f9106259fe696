"""Which of a repo's files a deployment needs.

- A GGUF model: the file named (`:FILE`), the one a pattern matches (`:*Q4_K_M*.gguf`,
  `:Q4_K_M`), or the repo's only GGUF model; with all shards of a split model. Vision
  projectors (`mmproj*.gguf`) come along when the pattern names them too.
- A safetensors model: the weights (those the index names, if there is one, else every
  `*.safetensors` at the top), `config.json`, tokenizer and generation files. Other weight
  formats (`.bin`, `.pt`, `.onnx` …) and sub-folders of originals are left on the hub.
"""

from __future__ import annotations

import fnmatch
import json
import re
from pathlib import PurePosixPath
from typing import Any, Callable

from .hubs import RemoteFile
from .spec import SourceError

__all__ = ["Selection", "select_files"]

_SHARD = re.compile(r"-\d{5}-of-(\d{5})\.gguf$")
_SIDECARS = ("*.json", "*.model", "*.txt", "*.tiktoken", "*.jinja", "tokenizer*", "vocab*",
             "merges*")


class Selection:
    def __init__(self, model_format: str, files: list[RemoteFile], entry: str | None) -> None:
        self.format = model_format
        self.files = files
        self.entry = entry              # the file an engine loads (GGUF); None: the folder

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def weight_files(self) -> list[RemoteFile]:
        suffix = ".gguf" if self.format == "gguf" else ".safetensors"
        return [f for f in self.files if f.path.endswith(suffix)
                and not PurePosixPath(f.path).name.lower().startswith("mmproj")]


def select_files(source: dict[str, Any], listing: list[RemoteFile],
                 read_small: Callable[[str], bytes]) -> Selection:
    """The files to fetch for `source`. `read_small(path)` fetches a small file (the
    safetensors index) when the choice depends on it."""
    repo = source["repo"]
    by_path = {f.path: f for f in listing}
    wanted, pattern = source.get("file"), source.get("pattern")
    if wanted:
        if wanted not in by_path:
            raise SourceError(f"{repo} has no file {wanted!r} (it has {_some(by_path)})")
        if wanted.endswith(".gguf"):
            return _gguf(wanted, by_path)
        raise SourceError(f"{repo}:{wanted} is not a GGUF file; name the repo alone for its "
                          "safetensors model")
    if pattern:
        matched = [p for p in by_path if fnmatch.fnmatch(p.lower(), pattern.lower())]
        models = _gguf_models(matched)
        if not models:
            raise SourceError(f"nothing in {repo} matches {pattern!r} (GGUF files there: "
                              f"{_some(_gguf_models(list(by_path)))})")
        if len(models) > 1:
            raise SourceError(f"{pattern!r} matches {len(models)} GGUF models in {repo}: "
                              f"{', '.join(models[:6])}; name one")
        selection = _gguf(models[0], by_path)
        projectors = [by_path[p] for p in matched if PurePosixPath(p).name.lower().startswith("mmproj")]
        selection.files.extend(projectors)
        return selection
    models = _gguf_models(list(by_path))
    if len(models) == 1:
        return _gguf(models[0], by_path)
    if len(models) > 1:
        raise SourceError(f"{repo} has {len(models)} GGUF models; pick one as {repo}:FILE or "
                          f"{repo}:QUANT (for example {repo}:{models[0]})")
    return _safetensors(repo, by_path, read_small)


def _gguf_models(paths: list[str]) -> list[str]:
    """GGUF models among `paths` (a split model once, as its first shard), no projectors."""
    return sorted({_SHARD.sub("-00001-of-\\1.gguf", p) for p in paths
                   if p.endswith(".gguf") and not PurePosixPath(p).name.lower().startswith("mmproj")})


def _gguf(first: str, by_path: dict[str, RemoteFile]) -> Selection:
    if not _SHARD.search(first):
        return Selection("gguf", [by_path[first]], first)
    prefix = _SHARD.sub("", first)
    shards = sorted(p for p in by_path if _SHARD.search(p) and _SHARD.sub("", p) == prefix)
    count = int(_SHARD.search(first)[1])          # type: ignore[index]
    if len(shards) != count:
        raise SourceError(f"the split model {first} should have {count} shards; the repo has "
                          f"{len(shards)}")
    return Selection("gguf", [by_path[p] for p in shards], shards[0])


def _safetensors(repo: str, by_path: dict[str, RemoteFile],
                 read_small: Callable[[str], bytes]) -> Selection:
    top = {p: f for p, f in by_path.items() if "/" not in p}
    if "config.json" not in top:
        raise SourceError(f"{repo} holds neither a GGUF model nor a safetensors model with "
                          f"config.json (it has {_some(by_path)})")
    index = "model.safetensors.index.json"
    if index in top:
        try:
            weight_map = json.loads(read_small(index)).get("weight_map")
        except ValueError:
            raise SourceError(f"{repo}/{index} is not valid JSON") from None
        names = sorted(set(map(str, weight_map.values()))) if isinstance(weight_map, dict) else []
        missing = [n for n in names if n not in top]
        if missing or not names:
            raise SourceError(f"{repo}/{index} names weight files the repo lacks: "
                              f"{', '.join(missing[:4]) or 'none at all'}")
        weights = [top[n] for n in names]
    else:
        weights = [f for p, f in sorted(top.items()) if p.endswith(".safetensors")]
    if not weights:
        raise SourceError(f"{repo} has config.json but no *.safetensors weights (other "
                          f"formats such as .bin are not served)")
    sidecars = [f for p, f in sorted(top.items())
                if any(fnmatch.fnmatch(p, g) for g in _SIDECARS) and f not in weights]
    return Selection("safetensors", sidecars + weights, None)


def _some(paths: Any, limit: int = 6) -> str:
    names = sorted(paths)
    if not names:
        return "nothing"
    more = f", … {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more
