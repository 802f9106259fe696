"""What a model on disk is and how much memory it needs to serve.

The scheduler uses this to decide where a model fits, on every node, so it stays light:
the standard library only (no numpy, no `gguf` package). It reads GGUF headers and
Hugging Face `config.json` files, never tensor data.

Two formats are understood:

- **gguf**: a `.gguf` file, or a directory holding one (llama.cpp's own split files
  `name-00001-of-00003.gguf` count as one model; `mmproj*.gguf` projectors are ignored).
- **safetensors**: a directory with `config.json` and `*.safetensors` (the Hugging Face
  layout that vLLM, SGLang and transformers load).

Memory is an estimate meant for placement, not a promise: weights as stored on disk, an
f16 (or model dtype) KV cache for the context length, and a fixed + proportional allowance
for compute buffers and the engine's runtime.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import struct
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "DEFAULT_CONTEXT_LENGTH",
    "GGUFArray",
    "MAX_ARRAY_ITEMS",
    "MemoryEstimate",
    "ModelFileError",
    "OVERHEAD_FIXED_BYTES",
    "OVERHEAD_FRACTION",
    "context_length_for",
    "detect_format",
    "estimate_memory",
    "read_gguf_metadata",
    "resolve_model_file",
]

# The context a model is served with when the deployment names none: long enough for chat,
# short enough that a model trained on 128k tokens does not reserve a huge KV cache.
DEFAULT_CONTEXT_LENGTH = 4096

# Compute-buffer and runtime allowance. The fixed part covers what every engine process
# holds whatever the model (GPU runtime context, cuBLAS/hipBLAS workspaces, the HTTP
# server); the proportional part covers the per-layer scratch buffers of a forward pass,
# which grow with model width and context. llama.cpp reports compute buffers of a few
# hundred MiB for 7-8B models at 4k context, which this allowance matches in size.
OVERHEAD_FIXED_BYTES = 256 * 1024 * 1024
OVERHEAD_FRACTION = 0.05   # of weights + KV cache

# GGUF arrays longer than this (tokenizer vocabularies, merges) are skipped, not read:
# the scheduler never needs them and a 150k-token vocabulary would cost megabytes.
MAX_ARRAY_ITEMS = 1024

_KV_BYTES_GGUF = 2   # llama.cpp's default KV cache type is f16

_GGUF_MAGIC = b"GGUF"
_GGUF_VERSIONS = (2, 3)   # version 1 (2023) used 32-bit counts and is no longer written
_SPLIT_RE = re.compile(r"^(?P<stem>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})\.gguf$", re.IGNORECASE)

# GGUF value types: id -> (name, struct format or None for string/array)
_GGUF_TYPES: dict[int, tuple[str, str | None]] = {
    0: ("uint8", "B"), 1: ("int8", "b"), 2: ("uint16", "H"), 3: ("int16", "h"),
    4: ("uint32", "I"), 5: ("int32", "i"), 6: ("float32", "f"), 7: ("bool", "?"),
    8: ("string", None), 9: ("array", None),
    10: ("uint64", "Q"), 11: ("int64", "q"), 12: ("float64", "d"),
}
_STRING, _ARRAY = 8, 9

_TORCH_DTYPE_BYTES = {
    "float32": 4, "float": 4, "float16": 2, "half": 2, "bfloat16": 2,
    "float8_e4m3fn": 1, "float8_e5m2": 1,
}


class ModelFileError(ValueError):
    """A model path that cannot be used; the message is meant for the user as is."""


@dataclass(frozen=True)
class GGUFArray:
    """Stands in for a GGUF array too long to read (see MAX_ARRAY_ITEMS)."""

    item_type: str
    length: int


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a model needs to be served, by part (see the module doc for the model)."""

    weights_bytes: int
    kv_cache_bytes: int
    overhead_bytes: int
    total_bytes: int
    context_length: int
    format: str
    architecture: str | None

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


# --- format and files ---------------------------------------------------------------


def detect_format(path: str | os.PathLike[str]) -> str:
    """The format of a model file or directory: "gguf" or "safetensors" (else ModelFileError)."""
    p = _existing(path)
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
    p = _existing(path)
    fmt = detect_format(p)
    if fmt == "safetensors" or p.is_file():
        return p
    candidates = _gguf_candidates(p)
    if len(candidates) > 1:
        names = ", ".join(c.name for c in candidates)
        raise ModelFileError(f"{p} holds several GGUF models ({names}); point the model path at one file")
    return candidates[0]


def _existing(path: str | os.PathLike[str]) -> Path:
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


def _gguf_weight_files(model_file: Path) -> list[Path]:
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


def read_gguf_metadata(path: str | os.PathLike[str]) -> dict[str, object]:
    """The key/value metadata of a GGUF file, without reading any tensor.

    Besides the file's own keys, "GGUF.version", "GGUF.tensor_count" and "GGUF.kv_count"
    describe the header. Arrays longer than MAX_ARRAY_ITEMS come back as GGUFArray.
    """
    p = _existing(path)
    if p.is_dir():
        p = resolve_model_file(p)
    try:
        with p.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                raise ModelFileError(f"{p} is empty (0 bytes): the download may not have finished")
            # mmap: skipping a vocabulary is pointer arithmetic, with no reads or copies
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                return _GGUFHeader(mm, p).read()
    except OSError as exc:
        raise ModelFileError(f"cannot read {p}: {exc.strerror}") from exc


class _GGUFHeader:
    """A cursor over a mapped GGUF file that reads the header and the key/value section."""

    def __init__(self, buf: mmap.mmap, path: Path) -> None:
        self._buf, self._path, self._pos, self._order = buf, path, 0, "<"

    def read(self) -> dict[str, object]:
        if self._take(4) != _GGUF_MAGIC:
            raise ModelFileError(f"{self._path} is not a GGUF file (it does not start with 'GGUF')")
        version = self._version()
        tensor_count, kv_count = self._unpack("Q"), self._unpack("Q")
        meta: dict[str, object] = {
            "GGUF.version": version, "GGUF.tensor_count": tensor_count, "GGUF.kv_count": kv_count,
        }
        for _ in range(kv_count):
            key = self._string()
            meta[key] = self._value(self._unpack("I"))
        return meta   # tensor infos follow; the scheduler needs none of them

    def _version(self) -> int:
        raw = self._take(4)
        for order in ("<", ">"):   # big-endian GGUF exists (s390x builds): its version reads swapped
            (version,) = struct.unpack(order + "I", raw)
            if version in _GGUF_VERSIONS:
                self._order = order
                return version
        (version,) = struct.unpack("<I", raw)
        if version == 1:
            raise ModelFileError(f"{self._path} is GGUF version 1, which is no longer supported: convert it again")
        raise ModelFileError(f"{self._path} has an unknown GGUF version ({version})")

    def _value(self, vtype: int) -> object:
        fmt = self._scalar_format(vtype)
        if fmt is not None:
            return self._unpack(fmt)
        if vtype == _STRING:
            return self._string()
        item_type, count = self._unpack("I"), self._unpack("Q")
        if count > MAX_ARRAY_ITEMS:
            self._skip_items(item_type, count)
            return GGUFArray(_GGUF_TYPES[item_type][0], count)
        return [self._value(item_type) for _ in range(count)]

    def _skip_items(self, item_type: int, count: int) -> None:
        """Move past `count` values of one type without decoding them."""
        fmt = self._scalar_format(item_type)
        if fmt is not None:
            self._advance(struct.calcsize(fmt) * count)
            return
        for _ in range(count):
            if item_type == _STRING:
                self._advance(self._unpack("Q"))
            else:   # an array of arrays: each one says its own type and length
                nested_type = self._unpack("I")
                self._skip_items(nested_type, self._unpack("Q"))

    def _scalar_format(self, vtype: int) -> str | None:
        if vtype not in _GGUF_TYPES:
            raise ModelFileError(f"{self._path} is corrupt: unknown GGUF value type {vtype} at byte {self._pos}")
        return _GGUF_TYPES[vtype][1]

    def _string(self) -> str:
        start = self._pos
        self._advance(self._unpack("Q"))
        return self._buf[start + 8:self._pos].decode("utf-8", errors="replace")

    def _unpack(self, fmt: str) -> Any:   # int, float or bool, as `fmt` says
        start = self._pos
        self._advance(struct.calcsize(fmt))
        (value,) = struct.unpack_from(self._order + fmt, self._buf, start)
        return value

    def _take(self, n: int) -> bytes:
        start = self._pos
        self._advance(n)
        return self._buf[start:self._pos]

    def _advance(self, n: int) -> None:
        # Every length comes from the file itself: check it against the file's size
        # before trusting it, so a damaged length cannot make us read or allocate wildly.
        end = self._pos + n
        if end > len(self._buf):
            raise ModelFileError(
                f"{self._path} is truncated: its header needs byte {end:,} but the file has"
                f" {len(self._buf):,} (an unfinished download?)"
            )
        self._pos = end


# --- memory estimate ----------------------------------------------------------------


def context_length_for(model_context: int | None, requested: int | None) -> int:
    """The context an instance is served with: the requested one, else the default capped by the model's."""
    if requested is not None:
        if requested <= 0:
            raise ValueError(f"context length must be positive, not {requested}")
        return requested
    if model_context and model_context > 0:
        return min(model_context, DEFAULT_CONTEXT_LENGTH)
    return DEFAULT_CONTEXT_LENGTH


def estimate_memory(path: str | os.PathLike[str], context_length: int | None = None) -> MemoryEstimate:
    """Memory needed to serve the model at `path` with `context_length` tokens (None: default)."""
    if detect_format(path) == "gguf":
        return _estimate_gguf(resolve_model_file(path), context_length)
    return _estimate_safetensors(Path(path).expanduser(), context_length)


def _estimate_gguf(model_file: Path, requested: int | None) -> MemoryEstimate:
    weights = sum(f.stat().st_size for f in _gguf_weight_files(model_file))
    meta = read_gguf_metadata(model_file)
    arch = meta.get("general.architecture")
    if not isinstance(arch, str):
        raise ModelFileError(f"{model_file} has no general.architecture key: not a model GGUF")
    n_ctx = context_length_for(_int_or_none(meta.get(f"{arch}.context_length")), requested)
    kv = n_ctx * _gguf_kv_bytes_per_token(meta, arch, model_file)
    return _estimate(weights, kv, n_ctx, "gguf", arch)


def _gguf_kv_bytes_per_token(meta: dict[str, object], arch: str, model_file: Path) -> int:
    """K and V bytes one token takes across all layers (0 for models without attention)."""
    n_layer = _int_or_none(meta.get(f"{arch}.block_count"))
    n_embd = _int_or_none(meta.get(f"{arch}.embedding_length"))
    if not n_layer or not n_embd:
        raise ModelFileError(f"{model_file} lacks {arch}.block_count or {arch}.embedding_length")
    heads = _per_layer(meta.get(f"{arch}.attention.head_count"), n_layer)
    kv_heads = _per_layer(meta.get(f"{arch}.attention.head_count_kv", heads), n_layer)
    key_len = _int_or_none(meta.get(f"{arch}.attention.key_length"))
    value_len = _int_or_none(meta.get(f"{arch}.attention.value_length"))
    total = 0
    for n_head, n_head_kv in zip(heads, kv_heads):
        if n_head <= 0:
            continue   # recurrent (Mamba, RWKV) or attention-free layers keep no KV cache
        head_dim = n_embd // n_head
        total += n_head_kv * ((key_len or head_dim) + (value_len or head_dim))
    return total * _KV_BYTES_GGUF


def _per_layer(value: object, n_layer: int) -> list[int]:
    """A hyper-parameter that is one number for all layers, or a list with one per layer."""
    if isinstance(value, list):
        return [int(v) for v in value[:n_layer]]
    return [int(value) if isinstance(value, (int, float)) else 0] * n_layer


def _estimate_safetensors(directory: Path, requested: int | None) -> MemoryEstimate:
    weights = sum(f.stat().st_size for f in _safetensors_files(directory))
    config = _read_json(directory / "config.json")
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else None
    cfg = text if text and "num_hidden_layers" not in config else config   # multimodal: the LM's part
    n_ctx = context_length_for(_int_or_none(cfg.get("max_position_embeddings")), requested)
    kv = n_ctx * _hf_kv_bytes_per_token(cfg, directory)
    architectures = config.get("architectures")
    arch = architectures[0] if isinstance(architectures, list) and architectures else config.get("model_type")
    return _estimate(weights, kv, n_ctx, "safetensors", arch if isinstance(arch, str) else None)


def _hf_kv_bytes_per_token(cfg: dict[str, object], directory: Path) -> int:
    n_layer = _int_or_none(cfg.get("num_hidden_layers"))
    n_head = _int_or_none(cfg.get("num_attention_heads"))
    hidden = _int_or_none(cfg.get("hidden_size"))
    if not n_layer or not n_head:
        raise ModelFileError(f"{directory / 'config.json'} lacks num_hidden_layers or num_attention_heads")
    n_head_kv = _int_or_none(cfg.get("num_key_value_heads")) or n_head
    head_dim = _int_or_none(cfg.get("head_dim")) or (hidden or 0) // n_head
    if not head_dim:
        raise ModelFileError(f"{directory / 'config.json'} lacks hidden_size (or head_dim)")
    # engines keep the KV cache in the model's dtype unless told otherwise
    dtype = cfg.get("torch_dtype") or cfg.get("dtype") or "float16"
    dtype_bytes = _TORCH_DTYPE_BYTES.get(str(dtype), 2)
    return 2 * n_layer * n_head_kv * head_dim * dtype_bytes


def _safetensors_files(directory: Path) -> list[Path]:
    """The weight files; with an index, only those it names (repos may also ship consolidated copies)."""
    index = directory / "model.safetensors.index.json"
    if not index.is_file():
        return sorted(directory.glob("*.safetensors"))
    weight_map = _read_json(index).get("weight_map")
    if not isinstance(weight_map, dict):
        raise ModelFileError(f"{index} has no weight_map")
    files = [directory / name for name in sorted(set(map(str, weight_map.values())))]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise ModelFileError(f"{directory} is missing weight files named in its index: {', '.join(missing)}")
    return files


def _read_json(path: Path) -> dict[str, object]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ModelFileError(f"cannot read {path}: {exc.strerror}") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelFileError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelFileError(f"{path} should hold a JSON object")
    return data


def _int_or_none(value: object) -> int | None:
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _estimate(weights: int, kv: int, n_ctx: int, fmt: str, arch: str | None) -> MemoryEstimate:
    overhead = OVERHEAD_FIXED_BYTES + int(OVERHEAD_FRACTION * (weights + kv))
    return MemoryEstimate(
        weights_bytes=weights,
        kv_cache_bytes=kv,
        overhead_bytes=overhead,
        total_bytes=weights + kv + overhead,
        context_length=n_ctx,
        format=fmt,
        architecture=arch,
    )
