"""Compatibility: an architecture no node's engine serves is refused before anything starts.

Which architectures an engine serves is read from the engine itself (llama.cpp's own name
table through xllamacpp, vLLM's registry, transformers' auto mappings), once per engine
version, into the replicated state. The tests ask the real engines, check the list against
the engine's own loader, and deploy to a real daemon a GGUF whose architecture llama.cpp
does not know and a safetensors model whose config names a class no engine has.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import gguf
import pytest

from gpumesh.backends.architectures import installation_architectures
from gpumesh.mesh.commands import apply_command, empty_state
from gpumesh.mesh.scheduler.architectures import architecture_check

from harness import Daemon
from tinymodels import write_tiny_gguf, write_tiny_hf_llama

NEW_ARCH = "gpumesh-newarch"          # no llama.cpp build knows it
NEW_CLASS = "GpumeshNoSuchForCausalLM"
WAIT_S = 240.0                        # a first vLLM read imports torch (cached afterwards)


# --- the check, on plain records ---------------------------------------------------------------

def _node(name: str, version: str | None, **extra: Any) -> dict[str, Any]:
    return {"id": name, "name": name, "status": "ready",
            "backends": {"llama.cpp": {"version": version}}, **extra}


def _record(arch: str, **extra: Any) -> dict[str, Any]:
    return {"backend": "llama.cpp", "format": "gguf", "estimate": {"architecture": arch},
            **extra}


TABLE = {"llama.cpp==1": {"architectures": ["llama", "qwen2", "qwen3"]},
         "llama.cpp==2": {"architectures": ["llama", "qwen2", "qwen3", "qwen4"]}}


def test_served_unread_and_refused_in_words():
    nodes = [_node("a", "1"), _node("b", "2")]
    served = architecture_check(_record("qwen4"), nodes, TABLE)
    assert served == {"check": "architecture", "ok": True,
                      "detail": "llama.cpp 2 serves the qwen4 architecture"}
    refused = architecture_check(_record("qwen5"), nodes, TABLE)
    assert refused is not None and not refused["ok"]
    assert refused["detail"].startswith(
        "no node's engine serves the architecture 'qwen5': llama.cpp 1 on a; llama.cpp 2 on b "
        "knows 4 others (closest: qwen4, qwen3, qwen2)")
    # a version nobody has read yet (or one installed on demand) leaves it open
    unread = architecture_check(_record("qwen5"), [*nodes, _node("c", "3")], TABLE)
    assert unread is not None and unread["ok"] and "not known yet" in unread["detail"]
    assert architecture_check(_record("qwen5"), [_node("d", None)], TABLE)["ok"]
    # the pinned version decides, on every node
    pinned = architecture_check(_record("qwen4", backend_version="1"), nodes, TABLE)
    assert pinned is not None and not pinned["ok"]


def test_nothing_to_say_for_images_model_types_and_nodes_out_of_play():
    nodes = [_node("a", "1")]
    assert architecture_check(_record("qwen5", image="llama:cpu"), nodes, TABLE) is None
    hf = {"backend": "llama.cpp", "format": "safetensors", "estimate": {"architecture": "llama"}}
    assert architecture_check(hf, nodes, TABLE) is None          # a model_type, not a class
    assert architecture_check(_record("qwen5"), [_node("a", "1", draining=True)], TABLE) is None
    assert architecture_check(_record("qwen5"), [_node("a", "1", status="unreachable")],
                              TABLE) is None


def test_one_entry_per_engine_version_written_once():
    command = {"op": "set_engine_architectures", "engine": "vllm", "version": "0.32.0",
               "architectures": ["B", "A", "A"], "source": "test", "node_id": "n1", "at": 1.0}
    state, result = apply_command(empty_state(), command)
    assert result == {"ok": True, "changed": True}
    assert state["engine_architectures"]["vllm==0.32.0"]["architectures"] == ["A", "B"]
    again, result = apply_command(state, {**command, "node_id": "n2", "at": 2.0})
    assert result == {"ok": True, "changed": False} and again is not state
    assert again["engine_architectures"] is state["engine_architectures"]


# --- the engines' own answers ------------------------------------------------------------------

def test_llama_cpp_names_its_architectures_and_its_loader_agrees(tmp_path: Path):
    found = installation_architectures("llama.cpp", None)
    assert {"llama", "qwen2", "gemma3"} <= set(found.names)
    assert NEW_ARCH not in found.names and "(unknown)" not in found.names
    assert "llm_arch_name" in found.source
    # The engine's loader agrees: given a GGUF header of each, it refuses the unknown name
    # in its own words, and gets past the architecture for the known one (to the
    # hyperparameters this header-only file lacks).
    for arch, known in (("llama", True), (NEW_ARCH, False)):
        header = tmp_path / f"{arch}.gguf"
        writer = gguf.GGUFWriter(str(header), arch)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.close()
        loaded = subprocess.run(
            [sys.executable, "-c", "import sys, xllamacpp as x\n"
             "p = x.CommonParams(); p.model.path = sys.argv[1]\n"
             "try:\n    x.Server(p)\nexcept RuntimeError:\n    pass", str(header)],
            capture_output=True, text=True, timeout=120)
        said = loaded.stdout + loaded.stderr
        assert "failed to load model" in said, said[-2000:]
        assert (f"unknown model architecture: '{arch}'" in said) is not known, said[-2000:]


def test_a_version_in_its_own_venv_answers_for_itself(tmp_path: Path):
    root = Path(__import__("os").environ["GPUMESH_BACKENDS_DIR"]) / "llama.cpp"
    homes = sorted(p for p in root.glob("*") if (p / "gpumesh-backend.json").exists()) \
        if root.is_dir() else []
    if not homes:
        pytest.skip("no xllamacpp version installed in the shared backends dir")
    found = installation_architectures("llama.cpp", str(homes[0]))
    assert "llama" in found.names and NEW_ARCH not in found.names


# --- a real daemon refuses them -------------------------------------------------------------

@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory):
    node = Daemon(tmp_path_factory.mktemp("arch") / "data")
    node.start()
    yield node
    node.kill()


def _evaluate(node: Daemon, body: dict[str, Any]) -> dict[str, Any]:
    code, answer = node.request("POST", "/api/models/evaluate", body, timeout=60)
    assert code == 200, answer
    return answer


def _decided(node: Daemon, body: dict[str, Any]) -> dict[str, Any]:
    """The evaluation once the engine's architectures have been read (bounded wait)."""
    deadline = time.monotonic() + WAIT_S
    while True:
        answer = _evaluate(node, body)
        check = next((c for c in answer["checks"] if c["check"] == "architecture"), None)
        if check is not None and "not known yet" not in check["detail"]:
            return answer
        if time.monotonic() > deadline:
            raise AssertionError(f"the architecture check stayed open: {answer}\n"
                                 f"{node.output()[-3000:]}")
        time.sleep(0.5)


def _check(answer: dict[str, Any]) -> dict[str, Any]:
    return next(c for c in answer["checks"] if c["check"] == "architecture")


def test_a_gguf_whose_architecture_llama_cpp_does_not_know_is_refused(daemon: Daemon,
                                                                     tmp_path: Path):
    model = write_tiny_gguf(tmp_path / "new.gguf", architecture=NEW_ARCH)
    answer = _decided(daemon, {"source": str(model), "name": "new"})
    check = _check(answer)
    assert not check["ok"] and not answer["fits"]
    assert check["detail"].startswith(f"no node's engine serves the architecture '{NEW_ARCH}': "
                                      "llama.cpp ")
    assert check["detail"] in answer["summary"]
    deployed = daemon.cli("deploy", str(model), "--name", "new")
    assert deployed.returncode == 2, deployed.stdout + deployed.stderr
    assert f"no node's engine serves the architecture '{NEW_ARCH}'" in deployed.stderr
    assert daemon.api("/api/models")[1]["data"] == []                 # nothing stored
    # a llama the same engine serves: the check says which version serves it
    known = write_tiny_gguf(tmp_path / "tiny.gguf")
    served = _check(_decided(daemon, {"source": str(known), "name": "tiny"}))
    assert served["ok"] and served["detail"].endswith("serves the llama architecture")


def _safetensors_engines(node: Daemon) -> list[str]:
    code, nodes = node.api("/api/nodes")
    backends = nodes["data"][0]["backends"]
    return [name for name in ("vllm", "transformers")
            if name in backends and backends[name].get("version")]


def test_a_safetensors_model_of_an_unknown_class_is_refused(daemon: Daemon, tmp_path: Path):
    engines = _safetensors_engines(daemon)
    if not engines:
        pytest.skip("no engine for safetensors (vLLM, transformers) is installed on this node")
    model = write_tiny_hf_llama(tmp_path / "hf", n_layer=1, hidden=64, intermediate=128)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "architectures": [NEW_CLASS]}))
    for engine in engines:
        answer = _decided(daemon, {"source": str(model), "name": "hf", "backend": engine})
        check = _check(answer)
        assert not check["ok"], check
        assert check["detail"].startswith(
            f"no node's engine serves the architecture '{NEW_CLASS}': {engine} ")
        assert "closest: " in check["detail"]            # e.g. LlamaForCausalLM
        deployed = daemon.cli("deploy", str(model), "--name", "hf", "--backend", engine)
        assert deployed.returncode == 2 and NEW_CLASS in deployed.stderr, deployed.stderr
    (model / "config.json").write_text(json.dumps(config))           # LlamaForCausalLM
    served = _check(_decided(daemon, {"source": str(model), "name": "hf",
                                      "backend": engines[0]}))
    assert served["ok"] and "serves the LlamaForCausalLM architecture" in served["detail"]
