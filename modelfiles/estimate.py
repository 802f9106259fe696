"""How much memory a model needs to serve, from what can be read without its weights.

Memory is an estimate meant for placement, not a promise: weights as stored on disk, an
f16 (or model dtype) KV cache for the context length, and a fixed + proportional allowance
for compute buffers and the engine's runtime.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

from .files import (ModelFileError, detect_format, gguf_weight_files, int_or_none, read_json,
                    resolve_model_file, safetensors_files)
from .gguf import read_gguf_metadata

__all__ = ["DEFAULT_CONTEXT_LENGTH", "MemoryEstimate", "OVERHEAD_FIXED_BYTES",
           "OVERHEAD_FRACTION", "context_length_for", "estimate_memory", "trained_context_length"]

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

_KV_BYTES_GGUF = 2   # llama.cpp's default KV cache type is f16

_TORCH_DTYPE_BYTES = {
    "float32": 4, "float": 4, "float16": 2, "half": 2, "bfloat16": 2,
    "float8_e4m3fn": 1, "float8_e5m2": 1,
}



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


def trained_context_length(path: str | os.PathLike[str]) -> int | None:
    """The longest context the model was trained for, as its files say (None if unsaid)."""
    if detect_format(path) == "gguf":
        meta = read_gguf_metadata(resolve_model_file(path))
        return int_or_none(meta.get(f"{meta.get('general.architecture')}.context_length"))
    config = read_json(Path(path).expanduser() / "config.json")
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else None
    cfg = text if text and "num_hidden_layers" not in config else config
    return int_or_none(cfg.get("max_position_embeddings"))


def _estimate_gguf(model_file: Path, requested: int | None) -> MemoryEstimate:
    weights = sum(f.stat().st_size for f in gguf_weight_files(model_file))
    meta = read_gguf_metadata(model_file)
    arch = meta.get("general.architecture")
    if not isinstance(arch, str):
        raise ModelFileError(f"{model_file} has no general.architecture key: not a model GGUF")
    n_ctx = context_length_for(int_or_none(meta.get(f"{arch}.context_length")), requested)
    kv = n_ctx * _gguf_kv_bytes_per_token(meta, arch, model_file)
    return _estimate(weights, kv, n_ctx, "gguf", arch)


def _gguf_kv_bytes_per_token(meta: dict[str, object], arch: str, model_file: Path) -> int:
    """K and V bytes one token takes across all layers (0 for models without attention)."""
    n_layer = int_or_none(meta.get(f"{arch}.block_count"))
    n_embd = int_or_none(meta.get(f"{arch}.embedding_length"))
    if not n_layer or not n_embd:
        raise ModelFileError(f"{model_file} lacks {arch}.block_count or {arch}.embedding_length")
    heads = _per_layer(meta.get(f"{arch}.attention.head_count"), n_layer)
    kv_heads = _per_layer(meta.get(f"{arch}.attention.head_count_kv", heads), n_layer)
    key_len = int_or_none(meta.get(f"{arch}.attention.key_length"))
    value_len = int_or_none(meta.get(f"{arch}.attention.value_length"))
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
    weights = sum(f.stat().st_size for f in safetensors_files(directory))
    config = read_json(directory / "config.json")
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else None
    cfg = text if text and "num_hidden_layers" not in config else config   # multimodal: the LM's part
    n_ctx = context_length_for(int_or_none(cfg.get("max_position_embeddings")), requested)
    kv = n_ctx * _hf_kv_bytes_per_token(cfg, directory)
    architectures = config.get("architectures")
    arch = architectures[0] if isinstance(architectures, list) and architectures else config.get("model_type")
    return _estimate(weights, kv, n_ctx, "safetensors", arch if isinstance(arch, str) else None)


def _hf_kv_bytes_per_token(cfg: dict[str, object], directory: Path) -> int:
    n_layer = int_or_none(cfg.get("num_hidden_layers"))
    n_head = int_or_none(cfg.get("num_attention_heads"))
    hidden = int_or_none(cfg.get("hidden_size"))
    if not n_layer or not n_head:
        raise ModelFileError(f"{directory / 'config.json'} lacks num_hidden_layers or num_attention_heads")
    n_head_kv = int_or_none(cfg.get("num_key_value_heads")) or n_head
    head_dim = int_or_none(cfg.get("head_dim")) or (hidden or 0) // n_head
    if not head_dim:
        raise ModelFileError(f"{directory / 'config.json'} lacks hidden_size (or head_dim)")
    # engines keep the KV cache in the model's dtype unless told otherwise
    dtype = cfg.get("torch_dtype") or cfg.get("dtype") or "float16"
    dtype_bytes = _TORCH_DTYPE_BYTES.get(str(dtype), 2)
    return 2 * n_layer * n_head_kv * head_dim * dtype_bytes


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
