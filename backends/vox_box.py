"""vox-box: speech-to-text (Whisper, FunASR …) and text-to-speech (CosyVoice, Bark …).

    <venv>/bin/python -m vox_box.main start --model DIR --host H --port P --device cuda:0

It serves /v1/audio/transcriptions and /v1/audio/speech and picks its own backend from the
model's files. On a GPU the process sees only its allocated GPU (CUDA_VISIBLE_DEVICES), so
the device it is told is always `cuda:0`. vox-box checks no API key: like every engine it
listens on loopback only, behind the gateway.
"""

from __future__ import annotations

import importlib.metadata
import tempfile
from pathlib import Path

from gpumesh.backends.base import (Backend, BackendUnavailable, InstallRecipe, LaunchRequest,
                                   LaunchSpec, distribution_version, python_of,
                                   visible_devices_env)

__all__ = ["VoxBoxBackend", "ENTRYPOINT"]

ENTRYPOINT = "vox_box.main"


class VoxBoxBackend(Backend):
    name = "vox-box"
    model_formats = frozenset({"safetensors"})
    kinds = frozenset({"stt", "tts"})
    gpu_vendors = frozenset({"nvidia"})
    runs_on_cpu = True
    health_path = "/health"
    reserved_flags = frozenset({"--host", "--port", "--model", "--device", "--data-dir",
                                "--huggingface-repo-id", "--model-scope-model-id"})

    def version(self) -> str:
        try:
            return importlib.metadata.version("vox-box")
        except importlib.metadata.PackageNotFoundError:
            raise BackendUnavailable("vox-box is not installed beside gpumesh; gpumesh installs a "
                                     "version on demand (`--backend vox-box==VERSION`)") from None

    def install_packages(self, version: str | None, gpu_vendors: frozenset[str]) -> InstallRecipe:
        return InstallRecipe(packages=(f"vox-box{'==' + version if version else ''}",),
                             distribution="vox-box")

    def installable_traits(self, gpu_vendors: frozenset[str]) -> tuple[bool, frozenset[str]]:
        return True, gpu_vendors & self.gpu_vendors

    def installed_version(self, engine_home: Path) -> str:
        return distribution_version(engine_home, ("vox-box",))

    def launch(self, request: LaunchRequest) -> LaunchSpec:
        env = visible_devices_env(request, self.gpu_vendors, "vox-box")
        device = "cuda:0" if request.gpu_vendor else "cpu"
        # Its data dir holds what it downloads (nothing, given a local model) and must be
        # writable: the model's own folder may be a read-only cache.
        data_dir = str(Path(tempfile.gettempdir()) / f"gpumesh-vox-box-{request.port}")
        argv = [python_of(request.engine_home), "-m", ENTRYPOINT, "start",
                "--model", request.model_path, "--host", request.host, "--port", str(request.port),
                "--device", device, "--data-dir", data_dir]
        return LaunchSpec(argv=tuple(argv + list(request.extra_args)), env=env,
                          image=request.image,
                          mounts=(request.model_path,) if request.image else ())
