"""A minimal GGUF header reader: the key/value metadata, never a tensor (no numpy)."""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .files import ModelFileError, existing, resolve_model_file

__all__ = ["GGUFArray", "GGUFHeader", "GGUFTruncated", "MAX_ARRAY_ITEMS", "parse_gguf_header",
           "read_gguf_header", "read_gguf_metadata"]

# GGUF arrays longer than this (tokenizer vocabularies, merges) are skipped, not read:
# the scheduler never needs them and a 150k-token vocabulary would cost megabytes.
MAX_ARRAY_ITEMS = 1024

_GGUF_MAGIC = b"GGUF"
_GGUF_VERSIONS = (2, 3)   # version 1 (2023) used 32-bit counts and is no longer written

# GGUF value types: id -> (name, struct format or None for string/array)
_GGUF_TYPES: dict[int, tuple[str, str | None]] = {
    0: ("uint8", "B"), 1: ("int8", "b"), 2: ("uint16", "H"), 3: ("int16", "h"),
    4: ("uint32", "I"), 5: ("int32", "i"), 6: ("float32", "f"), 7: ("bool", "?"),
    8: ("string", None), 9: ("array", None),
    10: ("uint64", "Q"), 11: ("int64", "q"), 12: ("float64", "d"),
}
_STRING, _ARRAY = 8, 9


class GGUFTruncated(ModelFileError):
    """The buffer ends inside the header: read at least `needed` bytes and parse again."""

    def __init__(self, message: str, needed: int) -> None:
        super().__init__(message)
        self.needed = needed


@dataclass(frozen=True)
class GGUFHeader:
    """The key/value metadata and, per tensor, its name, shape and data offset."""

    metadata: dict[str, object]
    tensors: list[tuple[str, tuple[int, ...], int, int]]   # name, dims, ggml type, offset
    data_start: int                                          # where tensor data begins

    def tensor_sizes(self, file_size: int) -> dict[str, int]:
        """Bytes of each tensor's data, from the offsets (the next tensor's start, or the end
        of the file): no table of ggml block sizes needed."""
        ordered = sorted(self.tensors, key=lambda t: t[3])
        ends = [t[3] for t in ordered[1:]] + [file_size - self.data_start]
        return {t[0]: max(0, end - t[3]) for t, end in zip(ordered, ends)}


@dataclass(frozen=True)
class GGUFArray:
    """Stands in for a GGUF array too long to read (see MAX_ARRAY_ITEMS)."""

    item_type: str
    length: int



def read_gguf_metadata(path: str | os.PathLike[str]) -> dict[str, object]:
    """The key/value metadata of a GGUF file, without reading any tensor.

    Besides the file's own keys, "GGUF.version", "GGUF.tensor_count" and "GGUF.kv_count"
    describe the header. Arrays longer than MAX_ARRAY_ITEMS come back as GGUFArray.
    """
    p = existing(path)
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


def read_gguf_header(path: str | os.PathLike[str]) -> GGUFHeader:
    """Metadata and tensor infos of a GGUF file (a model directory: its model file)."""
    p = existing(path)
    if p.is_dir():
        p = resolve_model_file(p)
    try:
        with p.open("rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                raise ModelFileError(f"{p} is empty (0 bytes): the download may not have finished")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                return _GGUFHeader(mm, p).read_with_tensors()
    except OSError as exc:
        raise ModelFileError(f"cannot read {p}: {exc.strerror}") from exc


def parse_gguf_header(prefix: bytes, name: str) -> GGUFHeader:
    """The header from the first bytes of a GGUF file (a remote file's byte range).

    Raises GGUFTruncated (with the size to fetch) when `prefix` ends inside the header."""
    return _GGUFHeader(prefix, Path(name), truncated_is_partial=True).read_with_tensors()


class _GGUFHeader:
    """A cursor over a GGUF file's bytes (mapped, or a prefix fetched by range) that reads
    the header, the key/value section and, on request, the tensor infos."""

    def __init__(self, buf: mmap.mmap | bytes, path: Path, truncated_is_partial: bool = False) -> None:
        self._buf, self._path, self._pos, self._order = buf, path, 0, "<"
        self._partial = truncated_is_partial

    def read_with_tensors(self) -> GGUFHeader:
        meta = self.read()
        tensors = []
        for _ in range(int(meta["GGUF.tensor_count"])):   # type: ignore[call-overload]
            name = self._string()
            dims = tuple(self._unpack("Q") for _ in range(self._unpack("I")))
            ggml_type, offset = self._unpack("I"), self._unpack("Q")
            tensors.append((name, dims, ggml_type, offset))
        alignment = meta.get("general.alignment", 32)
        alignment = alignment if isinstance(alignment, int) and alignment > 0 else 32
        data_start = -(-self._pos // alignment) * alignment
        return GGUFHeader(meta, tensors, data_start)

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
        if end > len(self._buf) and self._partial:
            raise GGUFTruncated(f"{self._path}: the header goes past byte {len(self._buf):,}",
                                needed=max(end, 2 * len(self._buf)))
        if end > len(self._buf):
            raise ModelFileError(
                f"{self._path} is truncated: its header needs byte {end:,} but the file has"
                f" {len(self._buf):,} (an unfinished download?)"
            )
        self._pos = end


