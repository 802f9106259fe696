"""MindIE: Huawei's inference service for Ascend NPUs, from its container image only.

MindIE Service is configured by a JSON file in the image
(`$MIES_INSTALL_PATH/conf/config.json`, by default under /usr/local/Ascend/mindie/latest/
mindie-service) and started by `mindieservice_daemon`. gpumesh starts the image with a short
Python program (the images ship Python) that writes what this instance needs into that file —
the model's name and path, the address and port, the NPUs and the context length — and
then execs the daemon, so the image's own defaults keep everything else. The NPUs are the
container's own (the runtime maps /dev/davinciN), numbered from 0.

Not verified on Ascend hardware (none here): the field names follow MindIE's documented
config.json. MindIE has no bearer-key setting gpumesh passes; like every engine it listens on
loopback only, behind the gateway. Its management and metrics ports keep the image's
defaults, so one MindIE instance per node.
"""

from __future__ import annotations

import json

from gpumesh.backends.base import Backend, BackendUnavailable, LaunchRequest, LaunchSpec

__all__ = ["MindieBackend", "CONFIG_ENV"]

CONFIG_ENV = "GPUMESH_MINDIE_CONFIG"
# Merges $GPUMESH_MINDIE_CONFIG into the image's config.json, then becomes the daemon.
_BOOT = """
import json, os
home = os.environ.get("MIES_INSTALL_PATH", "/usr/local/Ascend/mindie/latest/mindie-service")
path = os.path.join(home, "conf", "config.json")
config = json.load(open(path))
ours = json.loads(os.environ["GPUMESH_MINDIE_CONFIG"])
server = config.setdefault("ServerConfig", {})
server.update(ours["ServerConfig"])
backend = config.setdefault("BackendConfig", {})
backend["npuDeviceIds"] = ours["BackendConfig"]["npuDeviceIds"]
models = backend.setdefault("ModelDeployConfig", {})
models["maxSeqLen"] = ours["BackendConfig"]["ModelDeployConfig"]["maxSeqLen"]
model = (models.get("ModelConfig") or [{}])[0]
model.update(ours["BackendConfig"]["ModelDeployConfig"]["ModelConfig"][0])
models["ModelConfig"] = [model]
json.dump(config, open(path, "w"), indent=2)
os.chdir(home)
os.execv(os.path.join(home, "bin", "mindieservice_daemon"), ["mindieservice_daemon"])
"""


class MindieBackend(Backend):
    name = "mindie"
    model_formats = frozenset({"safetensors"})
    kinds = frozenset({"llm", "vlm"})
    gpu_vendors = frozenset({"ascend"})
    runs_on_cpu = False
    container_only = True
    health_path = "/v1/models"
    reserved_flags: frozenset[str] = frozenset()    # args are not passed to MindIE

    def version(self) -> str:
        raise BackendUnavailable("MindIE runs from its container image only: deploy with "
                                 "--image (e.g. an ascendhub mindie image)")

    def installable_traits(self, gpu_vendors: frozenset[str]) -> tuple[bool, frozenset[str]]:
        return False, gpu_vendors & self.gpu_vendors

    def launch(self, request: LaunchRequest) -> LaunchSpec:
        if not request.image:
            raise BackendUnavailable("MindIE runs from its container image only: deploy with --image")
        if request.gpu_vendor != "ascend" or not request.gpu_indices:
            raise BackendUnavailable("MindIE runs on Ascend NPUs only")
        config = mindie_config(request)
        return LaunchSpec(argv=("python3", "-c", _BOOT), env={CONFIG_ENV: json.dumps(config)},
                          image=request.image, mounts=(request.model_path,))


def mindie_config(request: LaunchRequest) -> dict[str, object]:
    """The parts of MindIE's config.json this instance decides."""
    npus = list(range(len(request.gpu_indices)))          # the container's own numbering
    server: dict[str, object] = {"ipAddress": request.host, "port": request.port,
                                 "httpsEnabled": False}
    return {
        "ServerConfig": server,
        "BackendConfig": {
            "npuDeviceIds": [npus],
            "ModelDeployConfig": {
                "maxSeqLen": request.context_length or 4096,
                "ModelConfig": [{"modelName": request.served_name, "modelWeightPath": request.model_path,
                                 "worldSize": len(npus)}],
            },
        },
    }
