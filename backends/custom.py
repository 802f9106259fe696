"""custom: any command or container image that serves an OpenAI-style API.

    gpumesh deploy ./model --backend custom --kind llm \\
        --arg my-server --arg --model={model_path} --arg --port={port} --arg --host={host}

The deployment's args are the whole command (with an image: the container's command; none
keeps the image's own). Placeholders, replaced in every argument:

    {model_path} {port} {host} {served_name} {gpus} {api_key} {context_length}

`{gpus}` is the allocated GPU indices, comma-separated (empty on the CPU); the process also
gets CUDA_/HIP_VISIBLE_DEVICES for them. The engine key is `{api_key}` for servers that take
it as an argument, and `OPENAI_API_KEY` in the environment for those that read that. gpumesh
checks readiness with GET /v1/models (with the key), which every OpenAI-style server answers.
"""

from __future__ import annotations

import re

from gpumesh import accelerators
from gpumesh.backends.base import (Backend, BackendUnavailable, LaunchRequest, LaunchSpec,
                                   visible_devices_env)
from gpumesh.modelfiles.kinds import KINDS

__all__ = ["CustomBackend", "PLACEHOLDERS"]

PLACEHOLDERS = ("model_path", "port", "host", "served_name", "gpus", "api_key", "context_length")
_PLACEHOLDER = re.compile(r"\{(\w+)\}")


class CustomBackend(Backend):
    name = "custom"
    model_formats: frozenset[str] = frozenset()    # any: the command knows what it loads
    kinds = frozenset(KINDS)
    gpu_vendors = frozenset(accelerators.VENDORS)
    runs_on_cpu = True
    health_path = "/v1/models"
    # The args are the whole command, host and port included (as placeholders).
    reserved_flags: frozenset[str] = frozenset()

    def version(self) -> str:
        return "-"                                 # nothing of its own to install

    def launch(self, request: LaunchRequest) -> LaunchSpec:
        if not request.extra_args and not request.image:
            raise BackendUnavailable("the custom backend runs the deployment's args as its command:"
                                     " give them (--arg my-server --arg --port={port} …) or an --image")
        values = {
            "model_path": request.model_path, "port": str(request.port), "host": request.host,
            "served_name": request.served_name,
            "gpus": ",".join(str(i) for i in request.gpu_indices),
            "api_key": request.api_key or "",
            "context_length": str(request.context_length or ""),
        }
        argv = tuple(_substitute(arg, values) for arg in request.extra_args)
        env = visible_devices_env(request, self.gpu_vendors, "a custom engine")
        if request.api_key:
            env["OPENAI_API_KEY"] = request.api_key
        return LaunchSpec(argv=argv, env=env, image=request.image,
                          mounts=(request.model_path,) if request.image else ())


def _substitute(arg: str, values: dict[str, str]) -> str:
    def replace(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in values:
            raise ValueError(f"unknown placeholder {{{name}}} in {arg!r}; known: "
                             + " ".join(f"{{{p}}}" for p in PLACEHOLDERS))
        return values[name]

    return _PLACEHOLDER.sub(replace, arg)
