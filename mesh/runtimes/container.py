"""The container runtime: the engine runs in a container of the spec's image (docker SDK).

- Host networking (the engine binds the loopback port gpumesh chose, as a process would).
- GPUs as device requests (NVIDIA) or device nodes (AMD); inside the container they are
  numbered from 0, so the spec's CUDA_/HIP_VISIBLE_DEVICES (host numbers) are dropped.
- The spec's mounts (the model's files, inside the node's model cache) are bind-mounted
  read-only at the same paths, so the argv means the same inside and out.
- Logs: a thread follows the container's output into the instance's rotated log.
- Every container is labelled with the node and instance it belongs to. The daemon stops
  its containers when it exits; after a crash (kill -9: nothing runs to stop them) the next
  start of the daemon removes the ones still labelled with its node (`reap_orphans`).

The docker SDK is blocking: every call runs on a worker thread. `DOCKER_HOST` is honoured.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

from .base import EngineHandle, EngineStartError, Runtime, StartRequest
from .logfile import RotatingLog

__all__ = ["ContainerRuntime", "LABEL_INSTANCE", "LABEL_NODE"]

log = logging.getLogger("gpumesh.agent")

LABEL_NODE = "io.gpumesh.node"
LABEL_INSTANCE = "io.gpumesh.instance"
_HOST_DEVICE_ENV = ("CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER",
                    "ASCEND_RT_VISIBLE_DEVICES")
_AMD_DEVICES = ("/dev/kfd", "/dev/dri")
# Ascend: one /dev/davinciN per NPU plus the driver's shared devices and files (as Huawei's
# container guide lists them).
_ASCEND_DEVICES = ("/dev/davinci_manager", "/dev/devmm_svm", "/dev/hisi_hdc")
_ASCEND_MOUNTS = ("/usr/local/Ascend/driver", "/usr/local/dcmi", "/usr/local/bin/npu-smi")


class ContainerRuntime(Runtime):
    name = "container"

    def __init__(self, node_id: str) -> None:
        self._node_id = node_id

    async def start(self, request: StartRequest) -> EngineHandle:
        client = await asyncio.to_thread(_client)
        container = await asyncio.to_thread(self._run, client, request)
        handle = ContainerHandle(container, request)
        await asyncio.to_thread(handle.refresh)
        return handle

    async def reap_orphans(self) -> int:
        try:
            client = await asyncio.to_thread(_client)
        except EngineStartError:
            return 0                      # no docker here: nothing can have been left
        return await asyncio.to_thread(self._remove_labelled, client)

    def _run(self, client: Any, request: StartRequest) -> Any:
        import docker.errors
        import docker.types

        spec = request.spec
        env = {k: v for k, v in spec.env.items() if k not in _HOST_DEVICE_ENV}
        options: dict[str, Any] = {}
        if request.gpu_vendor == "nvidia":
            options["device_requests"] = [docker.types.DeviceRequest(
                device_ids=[str(i) for i in request.gpu_indices], capabilities=[["gpu"]])]
        elif request.gpu_vendor == "amd":
            options["devices"] = [f"{d}:{d}" for d in _AMD_DEVICES]
            options["group_add"] = ["video"]
        elif request.gpu_vendor == "ascend":
            options["devices"] = [f"/dev/davinci{i}:/dev/davinci{i}" for i in request.gpu_indices] \
                + [f"{d}:{d}" for d in _ASCEND_DEVICES]
        volumes = {p: {"bind": p, "mode": "ro"} for p in spec.mounts}
        if request.gpu_vendor == "ascend":
            volumes.update({p: {"bind": p, "mode": "ro"} for p in _ASCEND_MOUNTS})
        name = f"gpumesh-{request.instance_id}"
        try:
            _remove_quietly(client, name)     # a container of an earlier attempt
            return client.containers.run(
                spec.image, command=list(spec.argv) or None, name=name, detach=True,
                environment=env, network_mode="host", init=True,
                volumes=volumes,
                labels={LABEL_NODE: self._node_id, LABEL_INSTANCE: request.instance_id},
                **options)
        except docker.errors.ImageNotFound:
            raise EngineStartError(f"image {spec.image} is not on this node and could not be "
                                   "pulled") from None
        except docker.errors.DockerException as exc:
            raise EngineStartError(f"docker could not start {spec.image}: {exc}") from None

    def _remove_labelled(self, client: Any) -> int:
        import docker.errors

        containers = client.containers.list(all=True,
                                            filters={"label": f"{LABEL_NODE}={self._node_id}"})
        for container in containers:
            log.info("removing container %s left by an earlier run of this node (instance %s)",
                     container.name, container.labels.get(LABEL_INSTANCE))
            try:
                container.remove(force=True)
            except docker.errors.NotFound:
                pass
        return len(containers)


class ContainerHandle(EngineHandle):
    def __init__(self, container: Any, request: StartRequest) -> None:
        self._container = container
        self.container_id = container.id
        self._returncode: int | None = None
        self._log = RotatingLog(request.log_file)
        self._log.write(f"--- container {container.name} ({container.short_id}) of "
                        f"{request.spec.image}\n".encode())
        self._follower = threading.Thread(target=self._follow_logs, daemon=True,
                                          name=f"logs-{request.instance_id}")
        self._follower.start()

    @property
    def returncode(self) -> int | None:
        return self._returncode

    def refresh(self) -> None:
        self._container.reload()
        self.pid = self._container.attrs["State"].get("Pid") or None

    async def wait(self) -> int:
        result = await asyncio.to_thread(self._container.wait)
        self._returncode = int(result.get("StatusCode", -1))
        return self._returncode

    async def stop(self, grace: float) -> None:
        await asyncio.to_thread(self._stop_and_remove, grace)

    def kill_now(self) -> None:
        try:
            self._container.kill()
        except Exception:  # noqa: BLE001 - already gone or docker down: nothing to kill
            pass

    def _stop_and_remove(self, grace: float) -> None:
        import docker.errors

        try:
            self._container.stop(timeout=int(max(1, grace)))
            self._returncode = int(self._container.wait(timeout=grace + 5).get("StatusCode", -1))
            self._container.remove(force=True)
        except docker.errors.NotFound:
            pass
        self._follower.join(timeout=2)
        self._log.close()

    def _follow_logs(self) -> None:
        try:
            for chunk in self._container.logs(stream=True, follow=True):
                self._log.write(chunk)
        except Exception as exc:  # noqa: BLE001 - the container went away: the log ends
            log.debug("log stream of %s ended: %s", self._container.name, exc)


def _client() -> Any:
    try:
        import docker
    except ImportError:
        raise EngineStartError("running engines in containers needs the docker package "
                               "(pip install docker)") from None
    try:
        client = docker.from_env()
        client.ping()
    except docker.errors.DockerException as exc:
        raise EngineStartError(f"no container runtime reachable (docker): {exc}") from None
    return client


def _remove_quietly(client: Any, name: str) -> None:
    import docker.errors

    try:
        client.containers.get(name).remove(force=True)
    except docker.errors.NotFound:
        pass
