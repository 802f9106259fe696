"""What a model on disk is: its format, its metadata, its kind and the memory it needs.

Shared by the daemon (`gpumesh.mesh`: deployments, the scheduler) and the engines
(`gpumesh.backends`), so it imports neither. The standard library only: it reads GGUF
headers and Hugging Face `config.json` files, never tensor data.

- `files`: format detection and the file an engine loads.
- `gguf`: the GGUF header reader.
- `facts`: what memory depends on, from GGUF headers or safetensors headers + config.json.
- `estimate`: the memory estimate per engine and device, used for placement.
- `kinds`: model kinds, the routes each answers, and the kind a model's files declare.
"""

from .estimate import (DEFAULT_CONTEXT_LENGTH, ENGINE_PROFILES, OVERHEAD_FIXED_BYTES,
                       OVERHEAD_FRACTION, MemoryEstimate, context_length_for, estimate_for,
                       estimate_from_size, estimate_memory, trained_context_length)
from .facts import ModelFacts, gguf_facts, model_facts, parse_safetensors_header, safetensors_facts
from .files import ModelFileError, detect_format, resolve_model_file
from .gguf import MAX_ARRAY_ITEMS, GGUFArray, read_gguf_metadata
from .kinds import KINDS, ROUTES_BY_KIND, detect_kind, find_mmproj, kind_serves

__all__ = [
    "ENGINE_PROFILES", "ModelFacts", "estimate_for", "estimate_from_size", "gguf_facts",
    "model_facts", "parse_safetensors_header", "safetensors_facts",
    "DEFAULT_CONTEXT_LENGTH", "GGUFArray", "KINDS", "MAX_ARRAY_ITEMS", "MemoryEstimate",
    "ModelFileError", "OVERHEAD_FIXED_BYTES", "OVERHEAD_FRACTION", "ROUTES_BY_KIND",
    "context_length_for", "detect_format", "detect_kind", "estimate_memory", "find_mmproj",
    "kind_serves", "read_gguf_metadata", "resolve_model_file", "trained_context_length",
]
