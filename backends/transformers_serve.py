"""transformers: Hugging Face transformers' own OpenAI-compatible server (`transformers serve`).

    <venv>/bin/python -I .../transformers_runner.py --model-path DIR --served-name N \\
        -- --host 127.0.0.1 --port P --device cpu [args]

The light engine for safetensors models: plain PyTorch, no pre-allocated KV cache, no
compile step, so it serves on a CPU-only node in seconds and a few hundred MB where vLLM
takes a minute and ~3 GB. It is not a throughput engine (one request at a time unless the
deployment passes `--continuous-batching`).

Installed per version in its own virtual env (`versions.py`): `transformers[serving]` and
Pillow (image processors of VLMs), with PyTorch's CPU build on nodes without NVIDIA GPUs
(`CPU_TORCH`, pinned: a local version label like `+cpu` can only be named exactly, and a
bare `torch` resolves to PyPI's CUDA build, several GB of nvidia-* wheels, wherever PyPI is
an index) and PyPI's CUDA build on NVIDIA nodes. AMD (ROCm builds of PyTorch) is not offered.

What the launch decides:
- It runs through `transformers_runner.py` (see there): the server is pinned to the model
  under the deployment's name, and the engine key is checked in front of the server —
  `transformers serve` itself has no API-key option, so the check is gpumesh's, not the
  engine's. The key travels in GPUMESH_ENGINE_KEY, never on the command line. Like every
  engine it listens on loopback only.
- Devices: on the CPU `--device cpu` (every GPU hidden); on NVIDIA GPUs the process sees
  only its allocation (CUDA_VISIBLE_DEVICES) and loads onto `cuda:0`, or spreads layers over
  several GPUs with `--device auto` (accelerate's device map: layers split, not tensor
  parallel).
- Kinds: chat and completions for text models (llm) and image-text models (vlm). The server
  also has `/v1/responses` and `/v1/audio/transcriptions`, but transcription needs audio
  decoders the serving extra does not install, so speech models go to vox-box. No
  embeddings or rerank routes.
- Context length: the server has no such option (a request's `max_tokens` bounds it); a
  deployment's `--context-length` only sizes the memory booking.
- With `--image`, the image's `python3` (which must have `transformers[serving]`) runs the
  runner file, bind-mounted read-only at the same path as on the host.

Responses name the model as the server was pinned to it: the served name from transformers
5.20 on; earlier 5.x releases append `@main`.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

from gpumesh.backends.base import (Backend, BackendUnavailable, InstallRecipe, LaunchRequest,
                                   LaunchSpec, distribution_version, python_of,
                                   visible_devices_env)

__all__ = ["TransformersBackend", "CPU_TORCH", "KEY_ENV", "RUNNER_FILE"]

# Run as a file by the version's interpreter: it needs nothing of gpumesh.
RUNNER_FILE = Path(__file__).resolve().with_name("transformers_runner.py")
KEY_ENV = "GPUMESH_ENGINE_KEY"          # = transformers_runner.KEY_ENV (a test keeps them equal)
CPU_TORCH = "torch==2.13.0+cpu"
_TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
# Built against CUDA torch: with the CPU build, importing them breaks transformers imports.
_CPU_EXCLUDES = ("torchvision", "torchaudio", "torchcodec")
_SERVE_DISTRIBUTIONS = ("transformers", "torch", "fastapi", "uvicorn")
KEY_NOTE = ("transformers serve has no API-key option: gpumesh's runner checks the engine key "
            "in front of it")


class TransformersBackend(Backend):
    name = "transformers"
    model_formats = frozenset({"safetensors"})
    kinds = frozenset({"llm", "vlm"})
    gpu_vendors = frozenset({"nvidia"})
    runs_on_cpu = True
    health_path = "/health"           # answers once the pinned model is loaded
    # Where it listens, what it loads (the positional model is the runner's), its devices,
    # and the hidden flag that would run the server in a thread of a process that then exits.
    reserved_flags = frozenset({"--host", "--port", "--device", "--api-key", "--non-blocking",
                                "--model-path", "--served-name"})

    def version(self) -> str:
        try:
            versions = [importlib.metadata.version(d) for d in _SERVE_DISTRIBUTIONS]
        except importlib.metadata.PackageNotFoundError:
            raise BackendUnavailable(
                "transformers serve is not installed beside gpumesh; gpumesh installs a version "
                "on demand (`--backend transformers==VERSION`)") from None
        return versions[0]

    def usable_gpu_vendors(self) -> frozenset[str]:
        # The built-in torch: "+cpu" (and ROCm's "+rocm…") builds drive no NVIDIA GPU.
        torch = importlib.metadata.version("torch")
        return frozenset() if "+" in torch and "+cu" not in torch else self.gpu_vendors

    def install_packages(self, version: str | None, gpu_vendors: frozenset[str]) -> InstallRecipe:
        transformers = f"transformers[serving]{'==' + version if version else ''}"
        if "nvidia" in gpu_vendors:
            return InstallRecipe(packages=(transformers, "torch", "pillow"),
                                 distribution="transformers")
        return InstallRecipe(packages=(transformers, CPU_TORCH, "pillow"),
                             excludes=_CPU_EXCLUDES, extra_index_urls=(_TORCH_CPU_INDEX,),
                             distribution="transformers")

    def installable_traits(self, gpu_vendors: frozenset[str]) -> tuple[bool, frozenset[str]]:
        # Both builds run on the CPU; only the CUDA one (on NVIDIA nodes) drives GPUs.
        return True, gpu_vendors & self.gpu_vendors

    def installed_version(self, engine_home: Path) -> str:
        return distribution_version(engine_home, ("transformers",))

    def describe(self) -> dict[str, object]:
        return {**super().describe(), "engine_key": KEY_NOTE}

    def launch(self, request: LaunchRequest) -> LaunchSpec:
        env = visible_devices_env(request, self.gpu_vendors, "transformers serve")
        # The model is on disk: nothing to ask the hub, and an offline node must not wait on it.
        env.update(HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1", DO_NOT_TRACK="1")
        if request.api_key:
            env[KEY_ENV] = request.api_key
        python = "python3" if request.image else python_of(request.engine_home)
        argv = [python, "-I", str(RUNNER_FILE), "--model-path", request.model_path,
                "--served-name", request.served_name, "--",
                *serve_options(request), *request.extra_args]
        return LaunchSpec(argv=tuple(argv), env=env, image=request.image,
                          mounts=(request.model_path, str(RUNNER_FILE)) if request.image else ())


def serve_options(request: LaunchRequest) -> list[str]:
    """`transformers serve` options for `request` (the model is given by the runner)."""
    return ["--host", request.host, "--port", str(request.port), "--device", _device(request)]


def _device(request: LaunchRequest) -> str:
    if request.gpu_vendor is None:
        return "cpu"
    # The process sees only its GPUs, numbered from 0.
    return "cuda:0" if len(request.gpu_indices) == 1 else "auto"
