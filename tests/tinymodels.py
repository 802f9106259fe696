"""Tiny models made on the spot, so tests run real engines offline and fast.

Test helpers only: this module is not part of the wheel and may use the `gguf` and
`numpy` packages (the `test` extra), which the daemon itself never imports.

The weights are random, so the text a model writes is garbage (often U+FFFD):
tests assert on the structure of answers (ids, roles, counts, order), not on words.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np

__all__ = ["CHAT_TEMPLATE", "image_tokens", "write_projector_header", "write_tiny_gguf",
           "write_tiny_hf_llama", "write_tiny_hf_llava", "write_tiny_mmproj", "tiny_png",
           "VLM_CHAT_TEMPLATE"]

# A minimal Jinja chat template (rendered by llama.cpp's own engine), so that
# /v1/chat/completions works without any template guessing by the server.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>{{ message['content'] }}</s>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

# A few whole-word pieces on top of the byte tokens, so tokenisation is not all bytes.
_WORD_PIECES = ("▁", "▁the", "▁hello", "▁world", "hello", "<|", "|>", "user", "assistant", "system")

_WEIGHT_STD = 0.02   # small random weights keep activations finite through every layer


def write_tiny_gguf(
    path: Path,
    *,
    n_layer: int = 2,
    n_embd: int = 64,
    n_head: int = 4,
    n_head_kv: int = 4,
    n_ff: int = 128,
    context_length: int = 256,
    seed: int = 0,
    pooling: str | None = None,
    architecture: str = "llama",
) -> Path:
    """Write a random-weight Llama model in GGUF (all F32) to `path` and return `path`.

    `pooling` ("mean", "rank" …) declares the model an embedding model (or a reranker) the
    way converted embedding GGUFs do, in `llama.pooling_type`. `architecture` renames
    `general.architecture` and its keys' prefix (a model llama.cpp may not know)."""
    if n_embd % n_head or n_head % n_head_kv:
        raise ValueError("n_embd must divide by n_head, and n_head by n_head_kv")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), architecture)
    n_vocab = _add_tokenizer(writer)
    _add_hparams(writer, n_layer, n_embd, n_head, n_head_kv, n_ff, context_length)
    if pooling is not None:
        writer.add_pooling_type(gguf.PoolingType[pooling.upper()])
    _add_tensors(writer, np.random.default_rng(seed), n_layer, n_embd, n_head, n_head_kv, n_ff, n_vocab)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _add_hparams(
    writer: gguf.GGUFWriter, n_layer: int, n_embd: int, n_head: int, n_head_kv: int, n_ff: int, context_length: int
) -> None:
    writer.add_name("gpumesh-tiny-llama")
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_context_length(context_length)
    writer.add_embedding_length(n_embd)
    writer.add_block_count(n_layer)
    writer.add_feed_forward_length(n_ff)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head_kv)
    writer.add_rope_dimension_count(n_embd // n_head)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_chat_template(CHAT_TEMPLATE)


def _add_tokenizer(writer: gguf.GGUFWriter) -> int:
    """A SentencePiece-style ("llama") vocabulary with byte fallback; returns its size."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + list(_WORD_PIECES)
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    types += [gguf.TokenType.BYTE] * 256 + [gguf.TokenType.NORMAL] * len(_WORD_PIECES)
    # SentencePiece merges by score: word pieces must beat their byte spelling.
    scores = [0.0] * 259 + [-float(i) for i in range(1, len(_WORD_PIECES) + 1)]
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_scores(scores)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(True)
    return len(tokens)


def _add_tensors(
    writer: gguf.GGUFWriter,
    rng: np.random.Generator,
    n_layer: int,
    n_embd: int,
    n_head: int,
    n_head_kv: int,
    n_ff: int,
    n_vocab: int,
) -> None:
    # numpy shapes are (rows, cols) = ggml's ne reversed: a weight mapping n_in to
    # n_out is stored as (n_out, n_in).
    def rand(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * _WEIGHT_STD).astype(np.float32)

    n_embd_kv = n_embd // n_head * n_head_kv
    writer.add_tensor("token_embd.weight", rand(n_vocab, n_embd))
    writer.add_tensor("output_norm.weight", np.ones(n_embd, dtype=np.float32))
    writer.add_tensor("output.weight", rand(n_vocab, n_embd))
    for i in range(n_layer):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(n_embd, dtype=np.float32))
        writer.add_tensor(f"blk.{i}.attn_q.weight", rand(n_embd, n_embd))
        writer.add_tensor(f"blk.{i}.attn_k.weight", rand(n_embd_kv, n_embd))
        writer.add_tensor(f"blk.{i}.attn_v.weight", rand(n_embd_kv, n_embd))
        writer.add_tensor(f"blk.{i}.attn_output.weight", rand(n_embd, n_embd))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(n_embd, dtype=np.float32))
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", rand(n_ff, n_embd))
        writer.add_tensor(f"blk.{i}.ffn_up.weight", rand(n_ff, n_embd))
        writer.add_tensor(f"blk.{i}.ffn_down.weight", rand(n_embd, n_ff))


# --- Hugging Face format (config.json + safetensors + tokenizer.json), for vLLM ----------

# vLLM's CPU attention kernel accepts head sizes of 32, 64, 80, 96, 112, 128, 256 (16 is
# refused): hidden 256 over 4 heads gives 64.
def write_tiny_hf_llama(
    directory: Path,
    *,
    n_layer: int = 2,
    hidden: int = 256,
    n_head: int = 4,
    intermediate: int = 512,
    context_length: int = 256,
    seed: int = 0,
) -> Path:
    """Write a random-weight Llama in Hugging Face's format (float32) into `directory`.

    numpy, safetensors and tokenizers only (no torch): a few MB, well under a second.
    """
    from safetensors.numpy import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    n_vocab = _write_hf_tokenizer(directory)
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": hidden, "intermediate_size": intermediate,
        "num_hidden_layers": n_layer, "num_attention_heads": n_head,
        "num_key_value_heads": n_head, "head_dim": hidden // n_head,
        "max_position_embeddings": context_length, "vocab_size": n_vocab,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu",
        "tie_word_embeddings": False, "torch_dtype": "float32",
        "bos_token_id": 1, "eos_token_id": 2,
    }
    (directory / "config.json").write_text(json.dumps(config, indent=1))
    (directory / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    rng = np.random.default_rng(seed)

    def rand(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * _WEIGHT_STD).astype(np.float32)

    tensors = {"model.embed_tokens.weight": rand(n_vocab, hidden),
               "model.norm.weight": np.ones(hidden, dtype=np.float32),
               "lm_head.weight": rand(n_vocab, hidden)}
    for i in range(n_layer):
        p = f"model.layers.{i}."
        tensors |= {
            p + "input_layernorm.weight": np.ones(hidden, dtype=np.float32),
            p + "post_attention_layernorm.weight": np.ones(hidden, dtype=np.float32),
            p + "self_attn.q_proj.weight": rand(hidden, hidden),
            p + "self_attn.k_proj.weight": rand(hidden, hidden),
            p + "self_attn.v_proj.weight": rand(hidden, hidden),
            p + "self_attn.o_proj.weight": rand(hidden, hidden),
            p + "mlp.gate_proj.weight": rand(intermediate, hidden),
            p + "mlp.up_proj.weight": rand(intermediate, hidden),
            p + "mlp.down_proj.weight": rand(hidden, intermediate),
        }
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return directory


def _write_hf_tokenizer(directory: Path) -> int:
    """A byte-fallback BPE tokenizer (SentencePiece style, "▁" for spaces); returns its size."""
    from tokenizers import Tokenizer, decoders, models, normalizers

    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + list(_WORD_PIECES)
    tokenizer = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=[],
                                     unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"),
                                                 normalizers.Replace(" ", "▁")])
    # Without Replace and Strip, "hello world" decodes as "helloworld" (or " hello world").
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                           decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tokenizer.add_special_tokens(["<unk>", "<s>", "</s>"])
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False,
        "model_max_length": 1 << 20, "chat_template": CHAT_TEMPLATE}))
    return len(tokens)


def write_projector_header(path: Path) -> Path:
    """A GGUF whose architecture is `clip`: what a VLM's mmproj file declares (header only;
    enough for kind detection, not for loading)."""
    writer = gguf.GGUFWriter(str(path), "clip")
    writer.add_name("gpumesh-tiny-mmproj")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_tiny_mmproj(
    path: Path,
    *,
    text_n_embd: int = 64,
    image_size: int = 32,
    patch_size: int = 8,
    n_embd: int = 32,
    n_ff: int = 64,
    n_head: int = 4,
    n_layer: int = 2,
    seed: int = 0,
) -> Path:
    """Write a random-weight LLaVA-style multimodal projector (all F32) to `path`.

    A CLIP vision tower (`n_layer` pre-norm blocks of width `n_embd` over
    `image_size`/`patch_size` square patches, a class token) and LLaVA's two-layer MLP
    projector (llama.cpp's `mlp` type: `mm.0` then GELU then `mm.2`) out to `text_n_embd`,
    which must be the language model's `n_embd`. llama.cpp's clip loader (tools/mtmd/clip.cpp)
    reads it as `llava-v1.5`'s mmproj files are read, so `--mmproj` takes it and an image
    becomes `image_tokens(...)` embeddings in the prompt (the class token is dropped).
    Name it `mmproj*.gguf` beside the model for gpumesh to deploy the pair as a `vlm`."""
    if n_embd % n_head or image_size % patch_size:
        raise ValueError("n_embd must divide by n_head, and image_size by patch_size")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)

    def rand(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * _WEIGHT_STD).astype(np.float32)

    def norm(prefix: str, width: int) -> None:       # a LayerNorm that starts as identity
        writer.add_tensor(prefix + ".weight", np.ones(width, dtype=np.float32))
        writer.add_tensor(prefix + ".bias", np.zeros(width, dtype=np.float32))

    def linear(prefix: str, n_out: int, n_in: int) -> None:
        writer.add_tensor(prefix + ".weight", rand(n_out, n_in))
        writer.add_tensor(prefix + ".bias", np.zeros(n_out, dtype=np.float32))

    writer = gguf.GGUFWriter(str(path), "clip")
    writer.add_name("gpumesh-tiny-mmproj")
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_clip_has_vision_encoder(True)
    writer.add_clip_projector_type("mlp")     # LLaVA 1.5's (gguf has no constant for it)
    writer.add_vision_image_size(image_size)
    writer.add_vision_patch_size(patch_size)
    writer.add_vision_embedding_length(n_embd)
    writer.add_vision_feed_forward_length(n_ff)
    writer.add_vision_projection_dim(text_n_embd)
    writer.add_vision_block_count(n_layer)
    writer.add_vision_head_count(n_head)
    writer.add_vision_attention_layernorm_eps(1e-5)
    writer.add_vision_image_mean([0.5, 0.5, 0.5])
    writer.add_vision_image_std([0.5, 0.5, 0.5])
    writer.add_vision_use_gelu(True)
    # ggml's conv kernel (ne: patch, patch, 3, n_embd) is numpy's (n_embd, 3, patch, patch).
    writer.add_tensor("v.patch_embd.weight", rand(n_embd, 3, patch_size, patch_size))
    writer.add_tensor("v.class_embd", rand(n_embd))
    writer.add_tensor("v.position_embd.weight", rand((image_size // patch_size) ** 2 + 1, n_embd))
    norm("v.pre_ln", n_embd)
    for i in range(n_layer):
        block = f"v.blk.{i}"
        norm(f"{block}.ln1", n_embd)
        for name in ("attn_q", "attn_k", "attn_v", "attn_out"):
            linear(f"{block}.{name}", n_embd, n_embd)
        norm(f"{block}.ln2", n_embd)
        linear(f"{block}.ffn_up", n_ff, n_embd)
        linear(f"{block}.ffn_down", n_embd, n_ff)
    linear("mm.0", text_n_embd, n_embd)
    linear("mm.2", text_n_embd, text_n_embd)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def image_tokens(image_size: int = 32, patch_size: int = 8) -> int:
    """How many prompt positions one image takes with `write_tiny_mmproj`'s projector."""
    return (image_size // patch_size) ** 2


# A LLaVA (CLIP vision tower + the Llama above) needs torch and transformers to be written
# consistently (weights, processor, image token): the script runs in an interpreter that
# has them, such as a transformers engine's virtual env.
_LLAVA_SCRIPT = r"""
import json, sys, torch
from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                          LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerFast)
text_dir, out, template = sys.argv[1], sys.argv[2], sys.argv[3]
tokenizer = PreTrainedTokenizerFast.from_pretrained(text_dir)
tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
text = json.load(open(text_dir + "/config.json"))
config = LlavaConfig(
    vision_config=CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, image_size=32, patch_size=8),
    text_config=LlamaConfig(vocab_size=len(tokenizer), **{k: text[k] for k in (
        "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "rope_theta")}),
    image_token_index=tokenizer.convert_tokens_to_ids("<image>"))
torch.manual_seed(0)
LlavaForConditionalGeneration(config).save_pretrained(out)
LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                  crop_size={"height": 32, "width": 32}),
               tokenizer=tokenizer, patch_size=8, chat_template=template,
               vision_feature_select_strategy="default",
               num_additional_image_tokens=1).save_pretrained(out)
"""

# Text and images, in the content-parts form OpenAI clients send for VLMs.
VLM_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for part in m['content'] %}"
    "{% if part['type'] == 'image' %}<image>{% elif part['type'] == 'text' %}{{ part['text'] }}"
    "{% endif %}{% endfor %}{% endif %}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def write_tiny_hf_llava(directory: Path, python: str | Path) -> Path:
    """Write a random-weight LLaVA (a 32x32-pixel CLIP tower on the tiny Llama) with its
    processor into `directory`, using `python` (an interpreter with torch + transformers)."""
    import subprocess

    directory = Path(directory)
    text_dir = write_tiny_hf_llama(directory.with_name(directory.name + "-text"))
    subprocess.run([str(python), "-c", _LLAVA_SCRIPT, str(text_dir), str(directory),
                    VLM_CHAT_TEMPLATE], check=True, capture_output=True, timeout=300)
    return directory


def tiny_png(width: int = 16, height: int = 16) -> bytes:
    """A solid red PNG, written by hand (zlib + struct: no imaging library needed)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    rows = b"".join(b"\x00" + b"\xff\x00\x00" * width for _ in range(height))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
