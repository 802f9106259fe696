"""Tiny models made on the spot, so tests run real engines offline and fast.

Test helpers only: this module is not part of the wheel and may use the `gguf` and
`numpy` packages (the `test` extra), which the daemon itself never imports.

The weights are random, so the text a model writes is garbage (often U+FFFD):
tests assert on the structure of answers (ids, roles, counts, order), not on words.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

__all__ = ["CHAT_TEMPLATE", "write_tiny_gguf"]

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
) -> Path:
    """Write a random-weight Llama model in GGUF (all F32) to `path` and return `path`."""
    if n_embd % n_head or n_head % n_head_kv:
        raise ValueError("n_embd must divide by n_head, and n_head by n_head_kv")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), "llama")
    n_vocab = _add_tokenizer(writer)
    _add_hparams(writer, n_layer, n_embd, n_head, n_head_kv, n_ff, context_length)
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
