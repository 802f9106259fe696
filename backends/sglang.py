"""SGLang: serves Hugging Face models on NVIDIA GPUs.

    <venv>/bin/python -m sglang.launch_server --model-path DIR --served-model-name N ...

Installed per version in its own virtual env (`sglang[all]==V`) on nodes with NVIDIA GPUs;
SGLang's CPU build needs its own kernels compiled from source, so gpumesh does not offer it
on the CPU. As for vLLM, gpumesh decides the GPU memory share (`--mem-fraction-static`, the
weights and KV cache pool, from the booking over the card's size), tensor parallel over the
allocated GPUs, and `--is-embedding` for embedding and rerank models. The engine key goes in
`--api-key` (SGLang reads it from nowhere else; the guard keeps it out of the log).
"""

from __future__ import annotations

import importlib.metadata
import math
from pathlib import Path

from gpumesh.backends.base import (Backend, BackendUnavailable, InstallRecipe, LaunchRequest,
                                   LaunchSpec, distribution_version, python_of,
                                   visible_devices_env)

__all__ = ["SglangBackend", "ENTRYPOINT"]

ENTRYPOINT = "sglang.launch_server"
_POOLING_KINDS = frozenset({"embedding", "rerank"})
_SHARE_CAP = 0.95


class SglangBackend(Backend):
    name = "sglang"
    model_formats = frozenset({"safetensors"})
    kinds = frozenset({"llm", "vlm", "embedding", "rerank"})
    gpu_vendors = frozenset({"nvidia"})
    runs_on_cpu = False
    health_path = "/health"
    reserved_flags = frozenset({"--host", "--port", "--model-path", "--model",
                                "--served-model-name", "--api-key", "--admin-api-key",
                                "--ssl-keyfile", "--ssl-certfile"})

    def version(self) -> str:
        try:
            return importlib.metadata.version("sglang")
        except importlib.metadata.PackageNotFoundError:
            raise BackendUnavailable("SGLang is not installed beside gpumesh; gpumesh installs a "
                                     "version on demand on NVIDIA nodes (`--backend sglang==VERSION`)"
                                     ) from None

    def install_packages(self, version: str | None, gpu_vendors: frozenset[str]) -> InstallRecipe | None:
        if "nvidia" not in gpu_vendors:
            return None
        return InstallRecipe(packages=(f"sglang[all]{'==' + version if version else ''}",),
                             distribution="sglang")

    def installable_traits(self, gpu_vendors: frozenset[str]) -> tuple[bool, frozenset[str]]:
        return False, gpu_vendors & self.gpu_vendors

    def installed_version(self, engine_home: Path) -> str:
        return distribution_version(engine_home, ("sglang",))

    def launch(self, request: LaunchRequest) -> LaunchSpec:
        if request.gpu_vendor is None:
            raise BackendUnavailable("SGLang in gpumesh runs on NVIDIA GPUs only")
        env = visible_devices_env(request, self.gpu_vendors, "SGLang", runs_on_cpu=False)
        argv = [python_of(request.engine_home), "-m", ENTRYPOINT,
                "--model-path", request.model_path, "--served-model-name", request.served_name,
                "--host", request.host, "--port", str(request.port)]
        if request.context_length is not None:
            argv += ["--context-length", str(request.context_length)]
        if len(request.gpu_indices) > 1:
            argv += ["--tp-size", str(len(request.gpu_indices))]
        share = _memory_share(request)
        if share is not None:
            argv += ["--mem-fraction-static", f"{share:.2f}"]
        if request.kind in _POOLING_KINDS:
            argv.append("--is-embedding")
        if request.api_key:
            argv += ["--api-key", request.api_key]
        return LaunchSpec(argv=tuple(argv + list(request.extra_args)), env=env,
                          image=request.image,
                          mounts=(request.model_path,) if request.image else ())


def _memory_share(request: LaunchRequest) -> float | None:
    """The booking per GPU over the card's size, rounded up to the hundredth."""
    if not request.memory_bytes or not request.device_memory_bytes:
        return None
    share = math.ceil(request.memory_bytes / request.device_memory_bytes * 100) / 100
    if share > _SHARE_CAP:
        raise ValueError(f"the instance is booked more of each GPU ({share:.0%}) than SGLang "
                         f"can be given ({_SHARE_CAP:.0%})")
    return max(share, 0.01)
