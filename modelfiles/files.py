"""Model files on disk: which format a path holds and which file an engine loads.

Two formats are understood:

- **gguf**: a `.gguf` file, or a directory holding one (llama.cpp's own split files
  `name-00001-of-00003.gguf` count as one model; `mmproj*.gguf` projectors are ignored).
- **safetensors**: a directory with `config.json` and `*.safetensors` (the Hugging Face
  layout that vLLM, SGLang and transformers load).

The standard library only: the scheduler and every backend read these on any node.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

__all__ = ["ModelFileError", "detect_format", "resolve_model_file", "gguf_weight_files",
           "safetensors_files", "read_json", "int_or_none"]

_GGUF_MAGIC = b"GGUF"
_SPLIT_RE = re.compile(r"^(?P<stem>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})\.gguf$", re.IGNORECASE)


class ModelFileError(ValueError):
    """A model path that cannot be used; the message is meant for the user as is."""


def detect_format(path: str | os.PathLike[str]) -> str:
    """The format of a model file or directory: "gguf" or "safetensors" (else ModelFileError)."""
    p = existing(path)
    if p.is_file():
        if p.suffix.lower() == ".gguf" or _has_gguf_magic(p):
            return "gguf"
        if p.suffix.lower() == ".safetensors":
            raise ModelFileError(
                f"{p} is a single safetensors file; point at its directory, which must hold config.json"
            )
        raise ModelFileError(f"{p} is not a model this node understands (neither GGUF nor a safetensors directory)")
    if _gguf_candidates(p):
        return "gguf"
    if (p / "config.json").is_file() and any(p.glob("*.safetensors")):
        return "safetensors"
    raise ModelFileError(
        f"{p} holds no model: expected a .gguf file, or config.json with *.safetensors files"
        f" (found: {_listing(p)})"
    )


def resolve_model_file(path: str | os.PathLike[str]) -> Path:
    """The path an engine loads: the GGUF file (first shard of a split), or the safetensors directory."""
    p = existing(path)
    fmt = detect_format(p)
    if fmt == "safetensors" or p.is_file():
        return p
    candidates = _gguf_candidates(p)
    if len(candidates) > 1:
        names = ", ".join(c.name for c in candidates)
        raise ModelFileError(f"{p} holds several GGUF models ({names}); point the model path at one file")
    return candidates[0]


def existing(path: str | os.PathLike[str]) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelFileError(f"model path does not exist: {p}")
    return p


def _has_gguf_magic(p: Path) -> bool:
    # Hugging Face's cache names blobs by hash, so a GGUF may come without its suffix.
    try:
        with p.open("rb") as f:
            return f.read(4) == _GGUF_MAGIC
    except OSError as exc:
        raise ModelFileError(f"cannot read {p}: {exc.strerror}") from exc


def _gguf_candidates(directory: Path) -> list[Path]:
    """GGUF models in a directory: one entry per split set, projectors left out."""
    found = []
    for f in sorted(directory.iterdir()):
        if not f.is_file() or f.suffix.lower() != ".gguf" or f.name.lower().startswith("mmproj"):
            continue
        split = _SPLIT_RE.match(f.name)
        if split and int(split["index"]) != 1:
            continue   # later shards are loaded through the first one
        found.append(f)
    return found


def gguf_weight_files(model_file: Path) -> list[Path]:
    """The model file and, for a split model, all of its shards."""
    split = _SPLIT_RE.match(model_file.name)
    if not split:
        return [model_file]
    count = int(split["count"])
    shards = [model_file.with_name(f"{split['stem']}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]
    missing = [s.name for s in shards if not s.is_file()]
    if missing:
        raise ModelFileError(f"split GGUF model {model_file.name} is missing shards: {', '.join(missing)}")
    return shards


def _listing(directory: Path, limit: int = 8) -> str:
    names = sorted(f.name for f in directory.iterdir())
    if not names:
        return "nothing"
    more = f", … {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


# --- GGUF header ------------------------------------------------------------------



def safetensors_files(directory: Path) -> list[Path]:
    """The weight files; with an index, only those it names (repos may also ship consolidated copies)."""
    index = directory / "model.safetensors.index.json"
    if not index.is_file():
        return sorted(directory.glob("*.safetensors"))
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict):
        raise ModelFileError(f"{index} has no weight_map")
    files = [directory / name for name in sorted(set(map(str, weight_map.values())))]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise ModelFileError(f"{directory} is missing weight files named in its index: {', '.join(missing)}")
    return files


def read_json(path: Path) -> dict[str, object]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ModelFileError(f"cannot read {path}: {exc.strerror}") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelFileError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelFileError(f"{path} should hold a JSON object")
    return data


def int_or_none(value: object) -> int | None:
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


