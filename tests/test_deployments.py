"""Unit tests for mesh/deployments.py (deploy specs -> model records) and mesh/sources.py.

Local sources use a real tiny GGUF written by tinymodels. Nothing here reaches the internet:
the one test that follows a repo id to the hub points the hub client at a closed port on
loopback first.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import msgpack
import pytest
from tinymodels import write_tiny_gguf

from gpumesh.mesh.deployments import MAX_REPLICAS, DeploymentError, build_model_record
from gpumesh.mesh.sources import (
    SourceError,
    describe_source,
    fetch_source,
    parse_source,
)
from gpumesh.mesh.sources.hubs import RemoteFile
from gpumesh.mesh.sources.select import select_files


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("models") / "tiny.gguf")


@pytest.fixture()
def safetensors_dir(tmp_path) -> Path:
    directory = tmp_path / "hf-model"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "num_hidden_layers": 2, "num_attention_heads": 4, "hidden_size": 64,
        "max_position_embeddings": 256, "torch_dtype": "float16",
    }))
    # a valid safetensors file (the estimate reads its header): length, JSON header, data
    header = json.dumps({"embed": {"dtype": "F16", "shape": [32, 64],
                                   "data_offsets": [0, 4096]}}).encode()
    (directory / "model.safetensors").write_bytes(
        len(header).to_bytes(8, "little") + header + b"\0" * 4096)
    return directory


def _spec(source, **extra) -> dict:
    return {"name": "tiny", "source": str(source), **extra}


def _refused(spec: dict, param: str) -> str:
    with pytest.raises(DeploymentError) as info:
        build_model_record(spec)
    assert info.value.param == param, (info.value.param, str(info.value))
    assert str(info.value)
    return str(info.value)


# --- a valid deployment ----------------------------------------------------------------------

def test_valid_gguf_spec_builds_a_record(gguf_file):
    before = time.time()
    record = build_model_record(_spec(gguf_file))
    assert record["name"] == "tiny"
    assert record["source"] == {"kind": "local", "path": str(gguf_file.resolve())}
    assert record["format"] == "gguf"
    assert record["backend"] == "llama.cpp"
    assert "backend_traits" not in record      # what a backend can do is per node
    assert record["replicas"] == 1
    assert record["context_length"] is None
    assert record["args"] == []
    assert record["schedule_error"] is None
    assert before <= record["created"] <= time.time()
    estimate = record["estimate"]
    assert estimate["format"] == "gguf"
    assert estimate["architecture"] == "llama"
    assert estimate["weights_bytes"] == gguf_file.stat().st_size
    assert estimate["total_bytes"] > gguf_file.stat().st_size
    assert estimate["total_bytes"] == (estimate["weights_bytes"] + estimate["kv_cache_bytes"]
                                       + estimate["overhead_bytes"])
    assert estimate["context_length"] == 256          # the tiny model's own, under the default


def test_record_is_plain_data(gguf_file):
    record = build_model_record(_spec(gguf_file, args=["--threads", "1"], context_length=64))
    raw = msgpack.packb(record, use_bin_type=True)
    assert msgpack.unpackb(raw, raw=False) == record


def test_optional_fields_are_kept(gguf_file):
    record = build_model_record(_spec(gguf_file, replicas=3, context_length=128,
                                      args=["--threads", "2"], backend="llama.cpp"))
    assert record["replicas"] == 3
    assert record["context_length"] == 128
    assert record["estimate"]["context_length"] == 128
    assert record["args"] == ["--threads", "2"]


def test_context_length_changes_the_estimate(gguf_file):
    small = build_model_record(_spec(gguf_file, context_length=16))["estimate"]
    large = build_model_record(_spec(gguf_file, context_length=256))["estimate"]
    assert large["kv_cache_bytes"] == 16 * small["kv_cache_bytes"]
    assert large["total_bytes"] > small["total_bytes"]


def test_directory_holding_a_gguf_is_accepted(gguf_file):
    record = build_model_record(_spec(gguf_file.parent))
    assert record["format"] == "gguf"
    assert record["source"]["path"] == str(gguf_file.parent.resolve())
    assert record["estimate"]["weights_bytes"] == gguf_file.stat().st_size


def test_backend_name_is_case_insensitive(gguf_file):
    assert build_model_record(_spec(gguf_file, backend="LLaMA.CPP"))["backend"] == "llama.cpp"


@pytest.mark.parametrize("replicas", [0, 1, MAX_REPLICAS])
def test_replicas_in_range(gguf_file, replicas):
    assert build_model_record(_spec(gguf_file, replicas=replicas))["replicas"] == replicas


@pytest.mark.parametrize("name", ["a", "A" * 128, "org/model:q4_k-m.v1", "9lives"])
def test_good_names(gguf_file, name):
    assert build_model_record({"name": name, "source": str(gguf_file)})["name"] == name


# --- refusals, each naming its parameter ---------------------------------------------------

@pytest.mark.parametrize(("name", "rule"), [
    ("", "name is empty"),
    ("-leading-dash", "must start with a letter or digit"),
    (".hidden", "must start with a letter or digit"),
    ("A" * 129, "129 characters long; the most is 128"),
    ("m" * 300, "300 characters long; the most is 128"),
    ("has space", "' ' at position 4: only letters, digits and . _ : / - are allowed"),
    ("semi;colon", "';' at position 5: only letters"),
    ("modèle", "'è' at position 4: names are ASCII"),
    ("模型", "'模' at position 1: names are ASCII"),
    (42, "must be a string, not int"),
    (["a"], "must be a string, not list"),
])
def test_bad_names_say_which_rule_failed(gguf_file, name, rule):
    message = _refused({"name": name, "source": str(gguf_file)}, "name")
    assert rule in message


@pytest.mark.parametrize(("file_name", "expected"), [
    ("tiny.gguf", "tiny"),
    ("Qwen2.5-0.5B-Instruct-Q4_K_M.gguf", "Qwen2.5-0.5B-Instruct-Q4_K_M"),
    ("my model (v2).gguf", "my-model-v2"),
])
def test_missing_name_defaults_to_the_file_name(gguf_file, tmp_path, file_name, expected):
    path = tmp_path / file_name
    path.write_bytes(gguf_file.read_bytes())
    assert build_model_record({"source": str(path)})["name"] == expected


def test_default_name_of_a_folder_and_of_repos(safetensors_dir):
    from gpumesh.mesh.deployments import default_name
    assert default_name({"kind": "local", "path": str(safetensors_dir)}) == "hf-model"
    assert default_name({"kind": "huggingface", "repo": "Qwen/Qwen2.5-0.5B-Instruct",
                         "file": None}) == "Qwen2.5-0.5B-Instruct"
    assert default_name({"kind": "huggingface", "repo": "o/n-GGUF",
                         "file": "sub/q4_k_m-00001-of-00003.gguf"}) == "q4_k_m"


def test_context_beyond_the_trained_one_is_refused_saying_the_limit(gguf_file):
    from gpumesh.modelfiles import trained_context_length
    trained = trained_context_length(gguf_file)
    assert trained and trained < 999999
    message = _refused(_spec(gguf_file, context_length=999999), "context_length")
    assert f"trained for ({trained} tokens): give at most {trained}" in message
    assert build_model_record(_spec(gguf_file, context_length=trained))["context_length"] == trained


@pytest.mark.parametrize("replicas", [-1, MAX_REPLICAS + 1, 1000, True, False, "2", 1.0, None])
def test_bad_replicas(gguf_file, replicas):
    message = _refused(_spec(gguf_file, replicas=replicas), "replicas")
    assert f"0 to {MAX_REPLICAS}" in message


@pytest.mark.parametrize("context_length", [0, -1, -4096, True, "4096", 512.0])
def test_bad_context_length(gguf_file, context_length):
    message = _refused(_spec(gguf_file, context_length=context_length), "context_length")
    assert "context_length must be a positive whole number" in message


@pytest.mark.parametrize("args", ["--threads 2", ["--threads", 2], [None], None, {"a": "b"},
                                  ("--x",)])
def test_bad_args(gguf_file, args):
    assert "list of strings" in _refused(_spec(gguf_file, args=args), "args")


@pytest.mark.parametrize("spec", [{"name": "tiny"}, {"name": "tiny", "source": ""},
                                  {"name": "tiny", "source": "   "},
                                  {"name": "tiny", "source": None}])
def test_missing_source(spec):
    assert "empty" in _refused(spec, "source")


@pytest.mark.parametrize("source", ["/definitely/not/here.gguf", "./missing-model",
                                    "~/no-such-model-dir", "models/missing.gguf",
                                    "missing.gguf"])
def test_path_like_source_that_does_not_exist(source, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    message = _refused(_spec(source), "source")
    assert "does not exist" in message
    assert source in message


def test_non_gguf_file(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("hello, not a model")
    message = _refused(_spec(notes), "source")
    assert "notes.txt" in message


def test_file_named_gguf_that_is_not_gguf(tmp_path):
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"NOPE" + b"\0" * 64)
    message = _refused(_spec(fake), "source")
    assert "not a GGUF file" in message


def test_empty_directory(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "holds no model" in _refused(_spec(empty), "source")


def test_unknown_backend_lists_the_known_ones(gguf_file):
    message = _refused(_spec(gguf_file, backend="no-such-engine"), "backend")
    assert "no-such-engine" in message
    assert "llama.cpp" in message            # the known backends are listed


def test_backend_that_cannot_serve_the_format(safetensors_dir):
    message = _refused(_spec(safetensors_dir, backend="llama.cpp"), "backend")
    assert "llama.cpp cannot serve safetensors" in message
    assert "gguf" in message


def test_a_safetensors_model_defaults_to_vllm_and_a_kind_no_backend_serves_is_refused(
        safetensors_dir):
    record = build_model_record(_spec(safetensors_dir))
    assert (record["backend"], record["backend_version"], record["kind"]) == ("vllm", None, "llm")
    message = _refused(_spec(safetensors_dir, kind="image"), "backend")
    assert "image" in message and "safetensors" in message


def test_backend_version_kind_and_image_are_recorded_or_refused(safetensors_dir, gguf_file):
    record = build_model_record(_spec(safetensors_dir, backend="vllm==0.25.1", kind="embedding"))
    assert (record["backend"], record["backend_version"], record["kind"]) == (
        "vllm", "0.25.1", "embedding")
    assert build_model_record(_spec(gguf_file, image="ghcr.io/ggml-org/llama.cpp:server"))[
        "image"] == "ghcr.io/ggml-org/llama.cpp:server"
    assert "NAME==VERSION" in _refused(_spec(gguf_file, backend="llama.cpp==latest!"), "backend")
    assert "kind must be one of" in _refused(_spec(gguf_file, kind="video"), "kind")
    assert "not a container image" in _refused(_spec(gguf_file, image="Bad Image"), "image")
    assert "does not serve stt" in _refused(_spec(gguf_file, kind="stt", backend="llama.cpp"),
                                            "backend")


def test_name_is_checked_before_the_source():
    _refused({"name": "bad name", "source": "/not/here"}, "name")


# --- repo ids reach the hub only through its HTTP API (HF_ENDPOINT) ----------------------

def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_repo_id_source_fails_fast_and_readably_when_the_hub_is_unreachable(monkeypatch):
    # Point the hub client at a closed loopback port: no traffic leaves the machine.
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    started = time.monotonic()
    message = _refused({"name": "remote", "source": "owner/name"}, "source")
    assert time.monotonic() - started < 5
    assert "owner/name" in message


# --- sources.parse_source ------------------------------------------------------------------

def test_existing_file_is_local_and_absolute(gguf_file, monkeypatch):
    monkeypatch.chdir(gguf_file.parent)
    assert parse_source("tiny.gguf") == {"kind": "local", "path": str(gguf_file.resolve())}
    assert parse_source(f"  {gguf_file}  ") == {"kind": "local", "path": str(gguf_file.resolve())}


def test_tilde_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "m").mkdir()
    assert parse_source("~/m") == {"kind": "local", "path": str((tmp_path / "m").resolve())}


def test_an_existing_relative_path_shaped_like_a_repo_is_local(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "owner" / "name").mkdir(parents=True)
    assert parse_source("owner/name")["kind"] == "local"


@pytest.mark.parametrize("text, repo, file", [
    ("owner/name", "owner/name", None),
    ("TheBloke/Llama-2-7B-GGUF", "TheBloke/Llama-2-7B-GGUF", None),
    ("hf://owner/name", "owner/name", None),
    ("huggingface://owner/name", "owner/name", None),
    ("owner/name:model-Q4_K_M.gguf", "owner/name", "model-Q4_K_M.gguf"),
    ("hf://owner/name:file.gguf", "owner/name", "file.gguf"),
    ("owner/name:sub/dir/model.gguf", "owner/name", "sub/dir/model.gguf"),
    ("org.x/model_v1.5", "org.x/model_v1.5", None),
])
def test_repo_ids(text, repo, file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)      # nothing of that name exists here
    assert parse_source(text) == {"kind": "huggingface", "repo": repo, "file": file,
                                  "revision": "main"}


def test_revision_is_recorded(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert parse_source("owner/name", revision="v2")["revision"] == "v2"


@pytest.mark.parametrize("text", ["just-a-name", "a/b/c", "owner/name:", "owner name/x",
                                  "http://example.com/x", "owner/", "hf://", ":file.gguf x"])
def test_garbage_is_refused(text, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SourceError) as info:
        parse_source(text)
    assert str(info.value)


def test_garbage_message_explains_both_forms(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SourceError, match="neither an existing path nor a Hugging Face or ModelScope repo id"):
        parse_source("just-a-name")


def test_empty_source_is_refused():
    with pytest.raises(SourceError, match="empty"):
        parse_source("  ")


# --- sources.describe_source ---------------------------------------------------------------

def test_describe_local_source():
    assert describe_source({"kind": "local", "path": "/m/x.gguf"}) == "/m/x.gguf"


def test_describe_huggingface_source():
    assert describe_source({"kind": "huggingface", "repo": "o/n", "file": None,
                            "revision": "main"}) == "hf://o/n"
    assert describe_source({"kind": "huggingface", "repo": "o/n", "file": "f.gguf",
                            "revision": "main"}) == "hf://o/n:f.gguf"


@pytest.mark.parametrize("text", ["owner/name", "hf://owner/name:file.gguf"])
def test_describe_then_parse_round_trips(text, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    source = parse_source(text)
    assert parse_source(describe_source(source)) == source


# --- sources.select_files (which of a repo's files) and fetch_source (local only) ----------

def _pick(names: list[str], **source) -> list[str]:
    listing = [RemoteFile(n, 10, None) for n in names]
    selection = select_files({"repo": "o/n", "file": None, **source}, listing,
                             lambda path: b'{"weight_map": {"a": "x-1.safetensors"}}')
    return [f.path for f in selection.files]


def test_a_safetensors_repo_gets_weights_and_sidecars_not_other_formats():
    assert _pick(["config.json", "model.safetensors", "README.md", "pytorch_model.bin",
                  "tokenizer.json", "original/consolidated.safetensors"]) == [
        "config.json", "tokenizer.json", "model.safetensors"]
    indexed = _pick(["config.json", "model.safetensors.index.json", "x-1.safetensors",
                     "consolidated.safetensors"])
    assert indexed == ["config.json", "model.safetensors.index.json", "x-1.safetensors"]


def test_the_only_gguf():
    assert _pick(["README.md", "model-Q4_K_M.gguf"]) == ["model-Q4_K_M.gguf"]


def test_several_ggufs_are_refused_with_how_to_name_one():
    with pytest.raises(SourceError) as info:
        _pick(["a-Q4.gguf", "a-Q8.gguf", "README.md"])
    message = str(info.value)
    assert "o/n has 2 GGUF models" in message
    assert "o/n:a-Q4.gguf" in message


def test_projectors_are_skipped_and_a_split_model_counts_once_with_all_shards():
    files = ["mmproj-model-f16.gguf", "m-00001-of-00003.gguf", "m-00003-of-00003.gguf",
             "m-00002-of-00003.gguf", "README.md"]
    shards = ["m-00001-of-00003.gguf", "m-00002-of-00003.gguf", "m-00003-of-00003.gguf"]
    assert _pick(files) == shards
    assert _pick(files, pattern="m-*.gguf") == shards
    assert _pick(files, file="m-00001-of-00003.gguf") == shards
    with pytest.raises(SourceError, match="should have 3 shards; the repo has 2"):
        _pick(files[:3])


def test_fetch_local_source(gguf_file, tmp_path):
    assert fetch_source({"kind": "local", "path": str(gguf_file)}, tmp_path) == gguf_file


def test_fetch_local_source_that_vanished(tmp_path):
    with pytest.raises(SourceError, match="does not exist on this node"):
        fetch_source({"kind": "local", "path": str(tmp_path / "gone.gguf")}, tmp_path)


def test_fetch_unknown_kind(tmp_path):
    with pytest.raises(SourceError, match="unknown model source kind 'ftp'"):
        fetch_source({"kind": "ftp"}, tmp_path)
