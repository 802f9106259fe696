"""The transformers backend without starting it: which engine a deployment gets by default
(through the real API on a real Raft store), what a deployment may not set, what a node
says it offers, and the runner's refusals. Serving for real is test_transformers_serve.py
(slow)."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from inprocess import InProcessNode, http_request, raft_threads
from tinymodels import write_tiny_gguf, write_tiny_hf_llama

from gpumesh.backends import transformers_serve
from gpumesh.backends.base import LaunchRequest
from gpumesh.backends.registry import default_backend_for, describe_backends
from gpumesh.backends.transformers_serve import RUNNER_FILE, TransformersBackend
from gpumesh.backends.versions import BackendVersions
from gpumesh.mesh.auth import ADMIN, new_api_key
from gpumesh.mesh.deployments import DeploymentError, build_model_record

CPU_NODE = {"llama.cpp": {"version": "2026.10.0", "runs_on_cpu": True, "gpu_vendors": [],
                          "builtin_version": "2026.10.0", "versions": [], "installable": True},
            "vllm": {"version": None, "runs_on_cpu": True, "gpu_vendors": [],
                     "builtin_version": None, "versions": [], "installable": True},
            "transformers": {"version": None, "runs_on_cpu": True, "gpu_vendors": [],
                             "builtin_version": None, "versions": [], "installable": True}}


def with_vllm(**traits: Any) -> dict[str, Any]:
    return {**CPU_NODE, "vllm": {**CPU_NODE["vllm"], **traits}}


@pytest.mark.parametrize(("nodes", "fmt", "kind", "expected"), [
    (None, "safetensors", "llm", "vllm"),                      # cluster unknown: as before
    ([CPU_NODE, CPU_NODE], "safetensors", "llm", "transformers"),
    ([CPU_NODE], "safetensors", "vlm", "transformers"),
    ([CPU_NODE, with_vllm(versions=["0.32.0"])], "safetensors", "llm", "vllm"),
    ([CPU_NODE, with_vllm(gpu_vendors=["nvidia"])], "safetensors", "llm", "vllm"),
    ([with_vllm(builtin_version="0.32.0")], "safetensors", "llm", "vllm"),
    ([CPU_NODE], "safetensors", "embedding", "vllm"),          # nothing lighter serves it
    ([CPU_NODE], "gguf", "llm", "llama.cpp"),
])
def test_default_engine_is_vllm_where_it_runs_and_transformers_on_cpu_only_nodes(
        nodes: list[dict] | None, fmt: str, kind: str, expected: str) -> None:
    assert default_backend_for(fmt, kind, nodes).name == expected


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory):
    node = InProcessNode(tmp_path_factory.mktemp("raft"), ("node-tf",))
    node.start()
    admin_key, admin_record = new_api_key("admin", ADMIN)
    node.submit({"op": "create_api_key", "key": admin_record, "only_if_no_admin": True})
    node.admin_key = admin_key                                  # type: ignore[attr-defined]
    yield node
    node.stop()
    assert raft_threads() == []


def deploy(node: InProcessNode, spec: dict[str, Any]) -> tuple[int, Any]:
    reply = asyncio.run(http_request(node.url + "/api/models", "POST", json_body=spec,
                                     key=node.admin_key))  # type: ignore[attr-defined]
    return reply.status, reply.body


def test_the_api_picks_the_engine_from_what_the_nodes_have(node: InProcessNode,
                                                           tmp_path: Path) -> None:
    model = str(write_tiny_hf_llama(tmp_path / "hf"))
    for node_id, backends in (("cpu-1", CPU_NODE), ("cpu-2", CPU_NODE)):
        node.submit({"op": "upsert_node", "node": {"id": node_id, "name": node_id,
                                                   "status": "ready", "backends": backends,
                                                   "updated": time.time()}})
    evaluated = asyncio.run(http_request(node.url + "/api/models/evaluate", "POST",
                                         json_body={"name": "light", "source": model},
                                         key=node.admin_key))  # type: ignore[attr-defined]
    assert (evaluated.status, evaluated.body["backend"]) == (200, "transformers")  # as deploy
    status, body = deploy(node, {"name": "light", "source": model})
    assert status == 201, body
    assert body["backend"] == "transformers"
    status, body = deploy(node, {"name": "pinned", "source": model, "backend": "vllm"})
    assert (status, body["backend"]) == (201, "vllm")            # asked for: always honoured

    # A node that has vLLM installed joins: vLLM is the default again.
    node.submit({"op": "upsert_node", "node": {"id": "cpu-3", "name": "cpu-3", "status": "ready",
                                               "backends": with_vllm(versions=["0.32.0"]),
                                               "updated": time.time()}})
    status, body = deploy(node, {"name": "heavy", "source": model})
    assert (status, body["backend"]) == (201, "vllm")


def test_a_deployment_may_not_set_what_gpumesh_sets(tmp_path: Path) -> None:
    model = str(write_tiny_hf_llama(tmp_path / "hf"))
    for flag in ("--port=9", "--host", "--device", "--non-blocking", "--served-name"):
        with pytest.raises(DeploymentError, match="args may not set"):
            build_model_record({"source": model, "backend": "transformers", "args": [flag]})
    record = build_model_record({"source": model, "backend": "transformers==5.24.0",
                                 "args": ["--dtype", "float32", "--continuous-batching"]})
    assert (record["backend"], record["backend_version"]) == ("transformers", "5.24.0")
    gguf = str(write_tiny_gguf(tmp_path / "m.gguf"))
    with pytest.raises(DeploymentError, match="cannot serve gguf"):
        build_model_record({"source": gguf, "backend": "transformers"})


def test_a_node_offers_it_installable_with_the_cpu_torch_and_says_who_checks_the_key(
        tmp_path: Path) -> None:
    described = {b["name"]: b for b in describe_backends(BackendVersions(tmp_path))}
    offered = described["transformers"]
    assert offered["available"] and offered["installable"] and offered["runs_on_cpu"]
    assert offered["gpu_vendors"] == [] and offered["kinds"] == ["llm", "vlm"]
    assert transformers_serve.CPU_TORCH in offered["install_packages"]
    assert "runner checks the engine key" in offered["engine_key"]
    gpu = TransformersBackend().install_packages("5.24.0", frozenset({"nvidia"}))
    assert gpu.packages[:2] == ("transformers[serving]==5.24.0", "torch")   # PyPI's CUDA build


def test_the_key_goes_in_the_environment_and_every_gpu_is_hidden_on_the_cpu() -> None:
    spec = TransformersBackend().launch(LaunchRequest(model_path="/m", served_name="m",
                                                      port=8000, api_key="s3cret"))
    assert "s3cret" not in " ".join(spec.argv)
    assert spec.env[transformers_serve.KEY_ENV] == "s3cret"
    assert spec.env["CUDA_VISIBLE_DEVICES"] == "-1" and spec.env["HF_HUB_OFFLINE"] == "1"
    image = TransformersBackend().launch(LaunchRequest(model_path="/m", served_name="m",
                                                       port=8000, image="hf/serve:1"))
    assert image.argv[:3] == ("python3", "-I", str(RUNNER_FILE))
    assert image.mounts == ("/m", str(RUNNER_FILE))             # the runner travels with it


def load_runner():
    spec = importlib.util.spec_from_file_location("transformers_runner_file", RUNNER_FILE)
    runner = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(runner)                             # type: ignore[union-attr]
    return runner


def test_the_runner_refuses_names_that_are_no_plain_path(tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    runner = load_runner()
    assert runner.KEY_ENV == transformers_serve.KEY_ENV
    model = str(write_tiny_hf_llama(tmp_path / "hf"))
    for name, words in (("a/../../etc", "'..' parts"), ("x:weights.gguf", "GGUF"),
                        ("a//b", "empty")):
        assert runner.main(["--model-path", model, "--served-name", name]) == 2
        assert words in capsys.readouterr().err
    assert runner.main(["--model-path", str(tmp_path / "nope"), "--served-name", "m"]) == 2
    assert "model directory not found" in capsys.readouterr().err


def test_the_runner_removes_what_killed_runners_left_behind(tmp_path: Path) -> None:
    runner = load_runner()
    dead = subprocess.Popen(["true"])
    dead.wait()
    target = tmp_path / "model"
    target.mkdir()
    for pid in (dead.pid, os.getpid()):
        directory = tmp_path / f"{runner.WORKDIR_PREFIX}{pid}-abc"
        directory.mkdir()
        (directory / "served").symlink_to(target)
    runner.remove_stale_workdirs(tmp_path)
    assert not (tmp_path / f"{runner.WORKDIR_PREFIX}{dead.pid}-abc").exists()
    assert (tmp_path / f"{runner.WORKDIR_PREFIX}{os.getpid()}-abc" / "served").exists()
    assert target.is_dir()                          # the link went, not what it pointed to
