"""Which model architectures an engine installation serves, read from the engine itself.

A deployment names an architecture (GGUF `general.architecture`, or the class in a
Hugging Face `config.json`'s `architectures`); an engine that does not know it fails only
when the model loads on a node, minutes later. The list comes from the engine, not from
a list written here, so a newer build answers for itself:

- llama.cpp: the build's own table of GGUF architecture names (`llm_arch_name`, over every
  value of its `llm_arch` enum up to `LLM_ARCH_UNKNOWN`), called through ctypes in the
  xllamacpp extension, or in the `libllama.so` of a llama-server binary. It is the table
  the loader looks names up in ("unknown model architecture: 'x'"). ~50 ms.
- vLLM: `ModelRegistry.get_supported_archs()` (seconds: it imports torch).
- transformers: every class its auto-model mappings name (`*_MAPPING_NAMES`).

Each probe runs this file in a child process under the engine's own interpreter (its
version's venv, or gpumesh's for the built-in; `probe_command`), so nothing of the engine is
imported into the daemon and a build whose symbols differ cannot take the daemon down. When a probe
cannot answer (no such symbol, an image, an engine without a list) the answer is None:
"cannot tell", never "serves nothing". This file needs nothing of gpumesh when it runs as a
script (stdlib only at module level).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Architectures", "ArchitecturesUnknown", "PROBE_TIMEOUT_S", "SCRIPT",
           "installation_architectures", "probe_command", "read_answer"]

SCRIPT = Path(__file__).resolve()
_MARK = "GPUMESH-ARCHITECTURES "
PROBE_TIMEOUT_S = 300.0           # vLLM imports torch: tens of seconds on a busy machine
# llama.cpp's C++ name for `const char * llm_arch_name(llm_arch)` (Itanium ABI).
_LLM_ARCH_NAME = "_Z13llm_arch_name8llm_arch"
_LLM_ARCH_UNKNOWN = "(unknown)"   # the name of the enum's last value
_MAX_ARCHS = 4096


@dataclass(frozen=True)
class Architectures:
    names: tuple[str, ...]
    source: str                   # where the names came from, in words

    def to_dict(self) -> dict[str, object]:
        return {"architectures": list(self.names), "source": self.source}


class ArchitecturesUnknown(Exception):
    """The installation could not say which architectures it serves; the message says why."""


def probe_command(engine: str, engine_home: str | None) -> tuple[list[str], dict[str, str]]:
    """The command (argv, environment) that asks one installation of `engine` — a version's
    venv (`engine_home`), or the built-in one (None) — for its architectures; its output
    goes to `read_answer`. Blocking (it may run `ldd`), briefly."""
    if engine not in _READERS:
        raise ArchitecturesUnknown(f"{engine} has no list of architectures to read")
    python = str(Path(engine_home) / "bin" / "python") if engine_home else sys.executable
    library = None
    if engine == "llama.cpp" and engine_home is None:
        from gpumesh.backends.llama_cpp import LlamaCppBackend   # gpumesh's side only
        binary = LlamaCppBackend().server_binary()
        if binary is not None:
            library = _libllama_of(binary)
            if library is None:
                raise ArchitecturesUnknown(f"no libllama.so found beside {binary}")
    argv = [python, "-I", str(SCRIPT), engine, *([library] if library else [])]
    env = {**os.environ, "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
           "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}
    return argv, env


def read_answer(engine: str, stdout: str, stderr: str, returncode: int | None) -> Architectures:
    """The probe's answer, or ArchitecturesUnknown saying why there is none."""
    for line in reversed(stdout.splitlines()):
        if line.startswith(_MARK):
            answer = json.loads(line[len(_MARK):])
            if "error" in answer:
                raise ArchitecturesUnknown(answer["error"])
            return Architectures(tuple(answer["architectures"]), answer["source"])
    tail = (stderr.strip().splitlines() or ["no output"])[-1]
    raise ArchitecturesUnknown(f"{engine} exited with status {returncode}: {tail[:300]}")


def installation_architectures(engine: str, engine_home: str | None,
                               timeout: float = PROBE_TIMEOUT_S) -> Architectures:
    """Blocking: probe_command run to the end, its answer read."""
    argv, env = probe_command(engine, engine_home)
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                              check=False, env=env, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ArchitecturesUnknown(f"asking {engine} failed: {exc}") from None
    return read_answer(engine, done.stdout, done.stderr, done.returncode)


def _libllama_of(binary: str) -> str | None:
    """The libllama.so a llama-server binary loads (ldd), or one beside it."""
    try:
        linked = subprocess.run(["ldd", binary], capture_output=True, text=True, timeout=10,
                                check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        linked = ""
    for line in linked.splitlines():
        if "libllama" in line and "=>" in line:
            path = line.split("=>", 1)[1].split("(")[0].strip()
            if path and Path(path).exists():
                return path
    here = Path(binary).resolve().parent
    for candidate in (here / "libllama.so", here.parent / "lib" / "libllama.so"):
        if candidate.exists():
            return str(candidate)
    return None


# --- the script side: runs under the engine's interpreter ------------------------------------

def _llama_cpp(library: str | None) -> tuple[list[str], str]:
    import ctypes
    if library is None:
        import xllamacpp.xllamacpp as extension      # the wheel's compiled llama.cpp
        library = extension.__file__
    try:
        name_of = getattr(ctypes.CDLL(library), _LLM_ARCH_NAME)
    except (OSError, AttributeError) as exc:
        raise LookupError(f"{library} does not export llm_arch_name: {exc}") from None
    name_of.restype, name_of.argtypes = ctypes.c_char_p, [ctypes.c_int]
    names = []
    for value in range(_MAX_ARCHS):
        name = (name_of(value) or b"").decode()
        if name == _LLM_ARCH_UNKNOWN:
            return sorted(set(names)), f"llm_arch_name over llm_arch in {Path(library).name}"
        if name and name != "unknown":               # a value without a name: skipped
            names.append(name)
    raise LookupError(f"{library}: no {_LLM_ARCH_UNKNOWN!r} after {_MAX_ARCHS} architectures")


def _vllm(_: str | None) -> tuple[list[str], str]:
    from vllm.model_executor.models.registry import ModelRegistry
    return sorted(ModelRegistry.get_supported_archs()), "vllm ModelRegistry.get_supported_archs()"


def _transformers(_: str | None) -> tuple[list[str], str]:
    import transformers.models.auto.modeling_auto as auto
    names: set[str] = set()
    for attribute, mapping in vars(auto).items():
        if attribute.endswith("_MAPPING_NAMES") and isinstance(mapping, dict):
            for value in mapping.values():
                names.update([value] if isinstance(value, str) else value)
    return sorted(n for n in names if not n.endswith("Config")), \
        "transformers auto-model mappings"


_READERS = {"llama.cpp": _llama_cpp, "vllm": _vllm, "transformers": _transformers}


def _main(argv: list[str]) -> int:
    # Bounded even if whoever asked is gone (a daemon killed with -9 never reaps us).
    signal.alarm(int(PROBE_TIMEOUT_S) + 5)
    engine, library = argv[0], (argv[1] if len(argv) > 1 else None)
    try:
        names, source = _READERS[engine](library)
        answer: dict[str, object] = {"architectures": names, "source": source}
    except Exception as exc:  # noqa: BLE001 - whatever it was, the caller gets it in words
        answer = {"error": f"{engine}: {type(exc).__name__}: {exc}"}
    sys.stdout.write("\n" + _MARK + json.dumps(answer) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
