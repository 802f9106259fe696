"""What a model is, as far as memory goes, read without its weights.

`ModelFacts` holds the numbers every engine's estimate needs: weight bytes (and the part an
engine keeps in host RAM even on a GPU), parameters and dtype, the shape (layers, width,
feed-forward width, vocabulary, heads), the KV cache per token, and the trained context.

They come from headers only:
- GGUF: the key/value metadata and the tensor infos (`gguf.GGUFHeader`);
- safetensors: `config.json` plus each file's header (8 bytes of length, then JSON naming
  every tensor's dtype and shape) — the parameter count and dtype without a tensor read.

Local files are read here. For a remote repo the caller fetches the same bytes by HTTP
range requests (`mesh/sources.py`) and hands them to `gguf_facts` / `safetensors_facts`.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping

from .files import (ModelFileError, detect_format, gguf_weight_files, int_or_none, read_json,
                    resolve_model_file, safetensors_files)
from .gguf import GGUFArray, GGUFHeader, read_gguf_header

__all__ = ["ModelFacts", "SAFETENSORS_DTYPE_BYTES", "gguf_facts", "model_facts",
           "read_safetensors_header", "safetensors_facts"]

# safetensors dtype names -> bytes per element
SAFETENSORS_DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4,
                           "F16": 2, "BF16": 2, "I16": 2, "U16": 2, "F8_E4M3": 1,
                           "F8_E5M2": 1, "I8": 1, "U8": 1, "BOOL": 1}
_TORCH_DTYPE_BYTES = {"float32": 4, "float": 4, "float16": 2, "half": 2, "bfloat16": 2,
                      "float8_e4m3fn": 1, "float8_e5m2": 1}
_SAFETENSORS_DTYPE_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16",
                            "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}
_GGUF_KV_BYTES = 2            # llama.cpp's default KV cache type is f16
_MAX_SAFETENSORS_HEADER = 100 << 20   # the format's own limit is 100 MB


@dataclass(frozen=True)
class ModelFacts:
    format: str                       # "gguf" or "safetensors"
    architecture: str | None
    weights_bytes: int                # the weight files as stored
    host_only_bytes: int              # kept in RAM even when offloaded (llama.cpp's input embedding)
    parameters: int | None
    dtype: str | None                 # the weights' dtype (safetensors) or GGUF file type
    trained_context: int | None
    n_layer: int
    n_embd: int
    n_ff: int                         # widest feed-forward a token passes (MoE: experts used × width)
    n_vocab: int
    n_head: int
    kv_bytes_per_token: int           # K and V of one token over all layers, in the engine's KV dtype
    kv_dtype_bytes: int

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def model_facts(path: str | os.PathLike[str]) -> ModelFacts:
    """Facts of a local model: a GGUF file (or directory holding one) or a safetensors dir."""
    if detect_format(path) == "gguf":
        model_file = resolve_model_file(path)
        files = gguf_weight_files(model_file)
        return gguf_facts(read_gguf_header(model_file), model_file.stat().st_size,
                          sum(f.stat().st_size for f in files), str(model_file))
    directory = Path(path).expanduser()
    files = safetensors_files(directory)
    headers = [read_safetensors_header(f) for f in files]
    return safetensors_facts(read_json(directory / "config.json"), headers,
                             sum(f.stat().st_size for f in files), str(directory))


# --- GGUF -------------------------------------------------------------------------------

def gguf_facts(header: GGUFHeader, first_file_size: int, weights_bytes: int,
               name: str) -> ModelFacts:
    """Facts from a GGUF header (of the first file of a split model) and the files' sizes."""
    meta = header.metadata
    arch = meta.get("general.architecture")
    if not isinstance(arch, str):
        raise ModelFileError(f"{name} has no general.architecture key: not a model GGUF")
    n_layer = int_or_none(meta.get(f"{arch}.block_count"))
    n_embd = int_or_none(meta.get(f"{arch}.embedding_length"))
    if not n_layer or not n_embd:
        raise ModelFileError(f"{name} lacks {arch}.block_count or {arch}.embedding_length")
    heads = _per_layer(meta.get(f"{arch}.attention.head_count"), n_layer)
    kv_heads = _per_layer(meta.get(f"{arch}.attention.head_count_kv", heads), n_layer)
    key_len = int_or_none(meta.get(f"{arch}.attention.key_length"))
    value_len = int_or_none(meta.get(f"{arch}.attention.value_length"))
    kv_elements = 0
    for n_head, n_head_kv in zip(heads, kv_heads):
        if n_head <= 0:
            continue   # recurrent (Mamba, RWKV) or attention-free layers keep no KV cache
        head_dim = n_embd // n_head
        kv_elements += n_head_kv * ((key_len or head_dim) + (value_len or head_dim))
    sizes = header.tensor_sizes(first_file_size)
    dims = {t[0]: t[1] for t in header.tensors}
    return ModelFacts(
        format="gguf", architecture=arch, weights_bytes=weights_bytes,
        # llama.cpp keeps the input embedding on the CPU; a model without its own output
        # matrix (tied embeddings) gets a copy of it on the GPU, so nothing is saved there.
        host_only_bytes=sizes.get("token_embd.weight", 0) if "output.weight" in sizes else 0,
        parameters=sum(math.prod(d) for d in dims.values()) or None,
        dtype=_gguf_file_type(meta.get("general.file_type")),
        trained_context=int_or_none(meta.get(f"{arch}.context_length")),
        n_layer=n_layer, n_embd=n_embd, n_ff=_gguf_ff(meta, arch, n_layer),
        n_vocab=_gguf_vocab(meta, arch, dims),
        n_head=max(heads) if heads else 0,
        kv_bytes_per_token=kv_elements * _GGUF_KV_BYTES, kv_dtype_bytes=_GGUF_KV_BYTES)


def _gguf_ff(meta: Mapping[str, object], arch: str, n_layer: int) -> int:
    dense = max(_per_layer(meta.get(f"{arch}.feed_forward_length"), n_layer) or [0])
    expert = int_or_none(meta.get(f"{arch}.expert_feed_forward_length")) or 0
    used = int_or_none(meta.get(f"{arch}.expert_used_count")) or 0
    return max(dense, expert * used)


def _gguf_vocab(meta: Mapping[str, object], arch: str, dims: dict[str, tuple[int, ...]]) -> int:
    tokens = meta.get("tokenizer.ggml.tokens")
    if isinstance(tokens, GGUFArray):
        return tokens.length
    if isinstance(tokens, list):
        return len(tokens)
    if vocab := int_or_none(meta.get(f"{arch}.vocab_size")):
        return vocab
    embd = dims.get("token_embd.weight")
    return embd[1] if embd and len(embd) > 1 else 0


# llama.cpp's LLAMA_FTYPE_* names for the common ones (general.file_type)
_GGUF_FILE_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1",
                    10: "Q2_K", 11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S",
                    15: "Q4_K_M", 16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K", 32: "BF16"}


def _gguf_file_type(value: object) -> str | None:
    number = int_or_none(value)
    return _GGUF_FILE_TYPES.get(number, f"type {number}") if number is not None else None


def _per_layer(value: object, n_layer: int) -> list[int]:
    """A hyper-parameter that is one number for all layers, or a list with one per layer."""
    if isinstance(value, list):
        return [int(v) for v in value[:n_layer]]
    return [int(value) if isinstance(value, (int, float)) else 0] * n_layer


# --- safetensors ----------------------------------------------------------------------------

def read_safetensors_header(path: Path) -> dict[str, object]:
    """The JSON header of a local safetensors file."""
    try:
        with path.open("rb") as f:
            return parse_safetensors_header(f.read(8), f.read, str(path))
    except OSError as exc:
        raise ModelFileError(f"cannot read {path}: {exc.strerror}") from exc


def parse_safetensors_header(first8: bytes, read: "callable[[int], bytes]",
                             name: str) -> dict[str, object]:
    """The header from its 8-byte length and a reader of the bytes that follow."""
    if len(first8) < 8:
        raise ModelFileError(f"{name} is too short to be a safetensors file")
    (length,) = struct.unpack("<Q", first8)
    if length > _MAX_SAFETENSORS_HEADER:
        raise ModelFileError(f"{name} announces a {length:,}-byte header: not a safetensors file")
    raw = read(length)
    if len(raw) < length:
        raise ModelFileError(f"{name} is truncated inside its header (an unfinished download?)")
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelFileError(f"{name} has no valid safetensors header: {exc}") from None
    if not isinstance(header, dict):
        raise ModelFileError(f"{name} has no valid safetensors header")
    return header


def safetensors_facts(config: Mapping[str, object], headers: list[Mapping[str, object]],
                      weights_bytes: int, name: str) -> ModelFacts:
    text = config.get("text_config")
    cfg: Mapping[str, object] = text if isinstance(text, dict) and "num_hidden_layers" not in config \
        else config                                     # multimodal: the language model's part
    n_layer = int_or_none(cfg.get("num_hidden_layers"))
    n_head = int_or_none(cfg.get("num_attention_heads"))
    hidden = int_or_none(cfg.get("hidden_size"))
    if not n_layer or not n_head:
        raise ModelFileError(f"{name}/config.json lacks num_hidden_layers or num_attention_heads")
    n_head_kv = int_or_none(cfg.get("num_key_value_heads")) or n_head
    head_dim = int_or_none(cfg.get("head_dim")) or (hidden or 0) // n_head
    if not head_dim:
        raise ModelFileError(f"{name}/config.json lacks hidden_size (or head_dim)")
    parameters, dtype = _count_parameters(headers)
    dtype = str(cfg.get("torch_dtype") or config.get("torch_dtype") or cfg.get("dtype") or dtype or "float16")
    kv_bytes = _TORCH_DTYPE_BYTES.get(dtype, 2)      # engines keep the KV cache in the model's dtype
    architectures = config.get("architectures")
    arch = architectures[0] if isinstance(architectures, list) and architectures else config.get("model_type")
    dense = int_or_none(cfg.get("intermediate_size")) or 4 * (hidden or 0)
    expert = (int_or_none(cfg.get("moe_intermediate_size")) or 0) * \
        (int_or_none(cfg.get("num_experts_per_tok")) or 0)
    return ModelFacts(
        format="safetensors", architecture=arch if isinstance(arch, str) else None,
        weights_bytes=weights_bytes, host_only_bytes=0, parameters=parameters, dtype=dtype,
        trained_context=int_or_none(cfg.get("max_position_embeddings")),
        n_layer=n_layer, n_embd=hidden or n_head * head_dim, n_ff=max(dense, expert),
        n_vocab=int_or_none(cfg.get("vocab_size")) or 0, n_head=n_head,
        kv_bytes_per_token=2 * n_layer * n_head_kv * head_dim * kv_bytes, kv_dtype_bytes=kv_bytes)


def _count_parameters(headers: list[Mapping[str, object]]) -> tuple[int | None, str | None]:
    """Total elements over every tensor, and the dtype holding most of them."""
    total = 0
    by_dtype: Counter[str] = Counter()
    for header in headers:
        for key, info in header.items():
            if key == "__metadata__" or not isinstance(info, dict):
                continue
            shape = info.get("shape")
            if isinstance(shape, list):
                count = math.prod(int(d) for d in shape)
                total += count
                by_dtype[str(info.get("dtype"))] += count
    if not total:
        return None, None
    top = by_dtype.most_common(1)[0][0]
    return total, _SAFETENSORS_DTYPE_NAMES.get(top, top.lower())
