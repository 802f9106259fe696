"""The container runtime with a real dockerd (root only): a llama.cpp engine in an image the
test imports (no registry here), deployed through gpumesh as a custom engine; labelled,
host-networked, the model mounted read-only; its log served by gpumesh; left running by a
kill -9 of the daemon and removed when the daemon starts again; stopped with the daemon."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import openai
import pytest

from dockerd import RUNNER_FILE, PrivateDockerd, build_llama_cpp_image
from harness import Daemon
from tinymodels import write_tiny_gguf

from gpumesh.mesh.runtimes.container import LABEL_INSTANCE, LABEL_NODE

pytestmark = pytest.mark.root
IMAGE = "gpumesh-test-llama:1"
GRAMMAR = 'root ::= "hello there"'


@pytest.fixture(scope="module")
def dockerd():
    daemon = PrivateDockerd()
    problem = daemon.start()
    if problem is not None:
        daemon.stop()
        pytest.skip(f"no container runtime here: {problem}")
    yield daemon
    daemon.stop()


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("boxed") / "tiny.gguf")


@pytest.fixture(scope="module")
def python_in_image(dockerd: PrivateDockerd, model: Path) -> str:
    started = time.monotonic()
    python = build_llama_cpp_image(dockerd.client(), IMAGE, model)
    print(f"engine image imported in {time.monotonic() - started:.1f} s")
    return python


def _labelled(client, node_id: str) -> list:  # type: ignore[no-untyped-def]
    return client.containers.list(all=True, filters={"label": f"{LABEL_NODE}={node_id}"})


def test_an_engine_in_a_container_serves_and_goes_with_its_daemon(
        dockerd: PrivateDockerd, model: Path, python_in_image: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOCKER_HOST", dockerd.host)
    client = dockerd.client()
    node = Daemon(tmp_path / "data")
    node.start()
    try:
        command = [python_in_image, str(RUNNER_FILE), "-m", "{model_path}", "--host", "{host}",
                   "--port", "{port}", "--alias", "{served_name}", "-c", "256", "-ngl", "0"]
        deployed = node.cli("deploy", str(model), "--name", "boxed", "--backend", "custom",
                            "--image", IMAGE, *[f"--arg={a}" for a in command],
                            "--wait", "--timeout", "120", timeout=150)
        assert deployed.returncode == 0, deployed.stderr + node.output()[-2000:]
        instance = node.wait_model("boxed")["instances"][0]
        assert instance["engine"]["runtime"] == "container"
        assert instance["engine"]["image"] == IMAGE
        node_id = instance["node_id"]
        [container] = _labelled(client, node_id)
        assert container.id == instance["engine"]["container"]
        assert container.labels[LABEL_INSTANCE] == instance["id"]
        assert container.attrs["HostConfig"]["NetworkMode"] == "host"
        assert [(m["Source"], m["RW"]) for m in container.attrs["Mounts"]] == [(str(model), False)]

        api = openai.OpenAI(base_url=node.url + "/v1", api_key=node.admin_key, max_retries=0,
                            timeout=30)
        reply = api.chat.completions.create(model="boxed", max_tokens=16,
                                            messages=[{"role": "user", "content": "hi"}],
                                            extra_body={"grammar": GRAMMAR})
        assert reply.choices[0].message.content == "hello there"
        logs = node.cli("logs", "boxed")
        assert "llama.cpp runner: serving" in logs.stdout and f"of {IMAGE}" in logs.stdout

        # kill -9: nothing runs to stop the container; the next start removes it.
        node.stop(signal.SIGKILL)
        assert [c.id for c in _labelled(client, node_id)] == [container.id]
        node.start()
        back = node.wait_model("boxed", timeout=120)["instances"][0]
        assert back["engine"]["container"] != container.id
        assert [c.id for c in _labelled(client, node_id)] == [back["engine"]["container"]]
        assert "left by an earlier run" in node.output()

        assert node.stop() == 0                          # Ctrl-C: the container goes too
        assert _labelled(client, node_id) == []
    finally:
        node.kill()
        for container in client.containers.list(all=True, filters={"label": LABEL_NODE}):
            container.remove(force=True)
