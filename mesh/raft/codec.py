"""msgpack in place of pickle for everything pysyncobj serialises: no code runs on decode.

pysyncobj pickles its wire messages, log entries (commands, membership changes), chunked
entries and snapshots (../RAFT-NOTES.md §4). Unpickling runs code, so whoever can get bytes
decoded would own the daemon. `install()` rebinds the `pickle` name inside pysyncobj's
modules to this codec (verified by a test that traps the standard unpickler): what remains
of pickle in pysyncobj is never called.

The codec round-trips exactly the types pysyncobj uses, and no others: None, bool, int,
float, str, bytes, list, dict, and — as msgpack extension types — tuple (pysyncobj tells
commands apart by `isinstance(x, tuple)`), set and frozenset (the cluster in a snapshot), and
pysyncobj's `TCPNode` (its address). Any other type is refused when encoding; unknown
extension types are refused when decoding.
"""

from __future__ import annotations

import io
from typing import Any, BinaryIO

import msgpack
from pysyncobj.node import TCPNode

__all__ = ["dumps", "loads", "dump", "load", "CodecError", "MAX_SNAPSHOT_BYTES"]

_TUPLE, _SET, _FROZENSET, _NODE = 1, 2, 3, 4
# A snapshot is read whole into memory: refuse anything larger than a state could be.
MAX_SNAPSHOT_BYTES = 256 << 20


class CodecError(ValueError):
    """Bytes that are not a value this codec wrote (or a value it cannot write)."""


def _default(value: Any) -> msgpack.ExtType:
    if type(value) is tuple:
        return msgpack.ExtType(_TUPLE, dumps(list(value)))
    if type(value) is set:
        return msgpack.ExtType(_SET, dumps(list(value)))
    if type(value) is frozenset:
        return msgpack.ExtType(_FROZENSET, dumps(list(value)))
    if type(value) is TCPNode:
        return msgpack.ExtType(_NODE, value.address.encode())
    raise TypeError(f"the Raft codec does not carry {type(value).__name__} values")


def _ext_hook(code: int, data: bytes) -> Any:
    if code == _TUPLE:
        return tuple(loads(data))
    if code == _SET:
        return set(loads(data))
    if code == _FROZENSET:
        return frozenset(loads(data))
    if code == _NODE:
        return TCPNode(data.decode())
    raise CodecError(f"unknown extension type {code}")


def dumps(value: Any, protocol: Any = None) -> bytes:
    """Encode; `protocol` is accepted (and ignored) for pickle's signature."""
    try:
        return msgpack.packb(value, default=_default, strict_types=True, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise CodecError(str(exc)) from None


def loads(data: bytes | bytearray | memoryview | str) -> Any:
    if isinstance(data, str):
        data = data.encode()
    try:
        return msgpack.unpackb(data, ext_hook=_ext_hook, raw=False, use_list=True)
    except CodecError:
        raise
    except Exception as exc:  # noqa: BLE001 - msgpack raises several types for bad bytes
        raise CodecError(f"not a value the Raft codec wrote: {exc}") from None


def dump(value: Any, file: BinaryIO, protocol: Any = None) -> None:
    file.write(dumps(value))


def load(file: BinaryIO) -> Any:
    data = file.read(MAX_SNAPSHOT_BYTES + 1)
    if len(data) > MAX_SNAPSHOT_BYTES:
        raise CodecError(f"a snapshot larger than {MAX_SNAPSHOT_BYTES} bytes was refused")
    return loads(data)


def to_bytes(data: bytes | str) -> bytes:
    """pysyncobj.pickle.to_bytes, which pysyncobj's serializer calls through `pickle`."""
    return data if isinstance(data, bytes) else data.encode("utf-8")


def round_trip(value: Any) -> Any:
    """Encode and decode (tests use it to show a value survives the codec)."""
    return load(io.BytesIO(dumps(value)))
