"""Model kinds, the OpenAI routes each kind answers, and the kind a model's files declare.

A model's kind decides which engine can serve it and which `/v1` routes reach it: a chat
request to an embedding model is refused with a clear 400 instead of an engine's 404.

Detection reads what the files say, never tensors:
- GGUF: `<arch>.pooling_type` (rank → rerank, any other pooling → embedding), encoder-only
  architectures (BERT family) → embedding, a `mmproj*.gguf` projector beside the model → vlm;
  a file whose architecture is `clip` *is* a projector, not a model.
- Hugging Face: `model_index.json` (diffusers) → image; `config.json` architectures:
  speech-to-text and text-to-speech heads, sequence classification with one label (a
  cross-encoder) → rerank, a vision tower (`vision_config`) → vlm, a bare encoder or a
  sentence-transformers layout → embedding, a causal LM → llm.
Users override it with `--kind` where the files say nothing (or say it wrong).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .files import ModelFileError, existing, int_or_none, read_json, resolve_model_file
from .gguf import read_gguf_metadata

__all__ = ["KINDS", "ROUTES_BY_KIND", "detect_kind", "find_mmproj", "kind_serves"]

KINDS = ("llm", "vlm", "embedding", "rerank", "image", "stt", "tts")

# The /v1 paths a model of each kind answers (`/v1/models` answers for every kind).
ROUTES_BY_KIND: dict[str, frozenset[str]] = {
    "llm": frozenset({"/v1/chat/completions", "/v1/completions"}),
    "vlm": frozenset({"/v1/chat/completions", "/v1/completions"}),
    "embedding": frozenset({"/v1/embeddings"}),
    "rerank": frozenset({"/v1/rerank", "/v1/score"}),
    "image": frozenset({"/v1/images/generations", "/v1/images/edits"}),
    "stt": frozenset({"/v1/audio/transcriptions", "/v1/audio/translations"}),
    "tts": frozenset({"/v1/audio/speech"}),
}

# llama.cpp's LLAMA_POOLING_TYPE_*: 0 none, 1 mean, 2 cls, 3 last, 4 rank (-1 unspecified).
_GGUF_RANK_POOLING = 4
_GGUF_ENCODER_ARCHS = frozenset({"bert", "nomic-bert", "nomic-bert-moe", "jina-bert-v2",
                                 "jina-bert-v3", "modern-bert", "neo-bert", "t5encoder"})
_STT = re.compile(r"(Whisper|SpeechSeq2Seq|ForCTC|Wav2Vec2|Speech2Text|Qwen2Audio)", re.I)
_TTS = re.compile(r"(TextToSpeech|TTS|Bark|Vits|CosyVoice|Kokoro|Dia(?:For|Model)|Parler)", re.I)
_VISION = re.compile(r"(VL|Vision|Llava|ImageText|Idefics|Pixtral|Paligemma|InternVL|MiniCPMV)", re.I)
_SENTENCE_TRANSFORMERS = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")


def kind_serves(kind: str | None, path: str) -> bool:
    """Whether a model of `kind` answers `path`; a model recorded before kinds existed is an llm."""
    return path in ROUTES_BY_KIND.get(kind or "llm", frozenset())


def detect_kind(path: str | os.PathLike[str]) -> str:
    """The kind the model at `path` declares (a GGUF file or a model directory); "llm" when
    the files say nothing more specific. Raises ModelFileError for a path that is no model."""
    p = existing(path)
    if p.is_dir() and (p / "model_index.json").is_file():
        return "image"
    if p.is_dir() and (p / "config.json").is_file() and not _has_gguf(p):
        return _kind_from_config(p)
    return _kind_from_gguf(resolve_model_file(p))


def find_mmproj(path: str | os.PathLike[str]) -> Path | None:
    """The multimodal projector beside a GGUF model (`mmproj*.gguf` in its directory)."""
    p = Path(path)
    directory = p if p.is_dir() else p.parent
    found = sorted(f for f in directory.glob("*.gguf") if f.name.lower().startswith("mmproj"))
    return found[0] if found else None


def _has_gguf(directory: Path) -> bool:
    return any(directory.glob("*.gguf"))


def _kind_from_gguf(model_file: Path) -> str:
    meta = read_gguf_metadata(model_file)
    arch = str(meta.get("general.architecture") or "")
    if arch == "clip":
        raise ModelFileError(f"{model_file} is a multimodal projector (mmproj), not a model: "
                             "deploy the language model beside it")
    pooling = int_or_none(meta.get(f"{arch}.pooling_type"))
    if pooling == _GGUF_RANK_POOLING:
        return "rerank"
    if (pooling is not None and pooling > 0) or arch in _GGUF_ENCODER_ARCHS:
        return "embedding"
    if find_mmproj(model_file) is not None:
        return "vlm"
    return "llm"


def _kind_from_config(directory: Path) -> str:
    config = read_json(directory / "config.json")
    architectures = [str(a) for a in config.get("architectures") or [] if isinstance(a, str)]
    names = " ".join(architectures)
    if _STT.search(names):
        return "stt"
    if _TTS.search(names):
        return "tts"
    if any(a.endswith("ForSequenceClassification") for a in architectures):
        labels = config.get("id2label")
        count = len(labels) if isinstance(labels, dict) else int_or_none(config.get("num_labels"))
        if count in (None, 1):
            return "rerank"                       # a cross-encoder scores a (query, text) pair
    if "vision_config" in config or _VISION.search(names):
        return "vlm"
    if any((directory / f).is_file() for f in _SENTENCE_TRANSFORMERS):
        return "embedding"
    if architectures and all(a.endswith(("Model", "ForMaskedLM")) for a in architectures):
        return "embedding"                        # an encoder without a generation head
    return "llm"
