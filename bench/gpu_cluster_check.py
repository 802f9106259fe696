"""The GPU proof of issue 20, as one driver: real daemons, real vLLM engines, real GPUs.

    PYTHONPATH=<site with gpumesh + vLLM> python3 bench/gpu_cluster_check.py --out DIR [--phase a|b|all]

Phase a, one daemon offered every GPU:
  - its node inventory (nvidia-ml-py) against nvidia-smi;
  - a one-GPU vLLM model and a model placed on two GPUs (tensor parallel 2) deployed together;
    each answers chat through the gateway; the GPU memory each engine's processes hold (NVML,
    per process) beside the booking the scheduler predicted; `CUDA_VISIBLE_DEVICES` read from
    /proc/PID/environ of every process of every engine;
  - the telemetry sampler's own cost, from /api/telemetry.
Phase b, two daemons on this machine, `--gpus 0` and `--gpus 1`, the second joining the first:
  - a process gpumesh did not start holds most of GPU 0 before daemon 0 starts: a one-replica
    model must go to GPU 1 (the memory held by the outsider is subtracted before placing);
  - the outsider stops, daemon 0 re-reads its GPU, the model scales to two replicas: one per node.

Everything it sees goes to DIR/check.log (and stdout); figures to DIR/check.json. Each step
records ok/failed and the run goes on where it can. Prints facts; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import traceback
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from harness import Daemon  # noqa: E402

GiB = 1 << 30
MiB = 1 << 20
LOG: Any = None
FIGURES: dict[str, Any] = {"steps": {}}


# --- output ------------------------------------------------------------------------------------

def say(*parts: Any) -> None:
    line = f"[{time.strftime('%H:%M:%S')}] " + " ".join(str(p) for p in parts)
    print(line, flush=True)
    if LOG is not None:
        LOG.write(line + "\n")
        LOG.flush()


def step(name: str, fn: Callable[[], Any]) -> Any:
    started = time.monotonic()
    say(f"== {name}")
    try:
        result = fn()
    except Exception as exc:  # a failed step is recorded and the run goes on
        FIGURES["steps"][name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}",
                                  "seconds": round(time.monotonic() - started, 1)}
        say(f"!! {name} FAILED after {time.monotonic() - started:.1f} s: {exc}")
        say(traceback.format_exc())
        return None
    FIGURES["steps"][name] = {"ok": True, "seconds": round(time.monotonic() - started, 1)}
    say(f"ok {name} ({time.monotonic() - started:.1f} s)")
    return result


def save(out: Path) -> None:
    (out / "check.json").write_text(json.dumps(FIGURES, indent=1, default=str))


# --- HTTP, processes, NVML ---------------------------------------------------------------------

def http(daemon: Daemon, path: str, body: Any = None, method: str | None = None,
         timeout: float = 60) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(daemon.url + path, data=data, method=method or
                                     ("POST" if body is not None else "GET"))
    request.add_header("Authorization", f"Bearer {daemon.admin_key}")
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            return exc.code, json.loads(raw)
        except ValueError:
            return exc.code, raw.decode(errors="replace")


def wait_for(what: str, check: Callable[[], Any], timeout: float, every: float = 2.0) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(every)
    raise TimeoutError(f"{what}: not within {timeout:.0f} s (last: {str(last)[:500]})")


def processes() -> dict[int, dict[str, Any]]:
    """pid -> ppid, pgid, command line, for every process."""
    found: dict[int, dict[str, Any]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        found[int(entry.name)] = {"ppid": int(fields[1]), "pgid": int(fields[2]),
                                  "cmd": cmdline.strip()[:160]}
    return found


def environ_of(pid: int, name: str) -> str | None:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return None
    for item in raw.split(b"\0"):
        key, _, value = item.partition(b"=")
        if key.decode(errors="replace") == name:
            return value.decode(errors="replace")
    return None


def engine_groups(daemon: Daemon) -> dict[int, list[int]]:
    """engine pid -> every pid of its process group (the engine runs in its own session)."""
    table = processes()
    assert daemon.process is not None
    engines = [pid for pid, p in table.items() if p["ppid"] == daemon.process.pid]
    return {e: sorted(pid for pid, p in table.items() if p["pgid"] == e) for e in engines}


def gpu_memory_by_pid() -> dict[int, dict[int, int]]:
    """pid -> {gpu index: bytes} from NVML's compute process lists ({} without NVML)."""
    import pynvml

    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        say(f"no NVML here: {exc}")
        return {}
    try:
        held: dict[int, dict[int, int]] = {}
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
                used = proc.usedGpuMemory or 0
                held.setdefault(proc.pid, {})[index] = used
        return held
    finally:
        pynvml.nvmlShutdown()


def describe_engines(daemon: Daemon, label: str) -> dict[str, Any]:
    """Each engine of `daemon`: its processes' CUDA_VISIBLE_DEVICES and GPU memory."""
    held = gpu_memory_by_pid()
    table = processes()
    report: dict[str, Any] = {}
    for engine, pids in engine_groups(daemon).items():
        visible = {pid: environ_of(pid, "CUDA_VISIBLE_DEVICES") for pid in pids}
        per_gpu: dict[int, int] = {}
        for pid in pids:
            for gpu, used in held.get(pid, {}).items():
                per_gpu[gpu] = per_gpu.get(gpu, 0) + used
        report[str(engine)] = {"cmd": table.get(engine, {}).get("cmd"),
                               "processes": len(pids), "pids": pids,
                               "NCCL_NVLS_ENABLE": sorted({environ_of(p, "NCCL_NVLS_ENABLE") or "unset" for p in pids}),
                               "CUDA_VISIBLE_DEVICES": sorted(set(v for v in visible.values() if v is not None)),
                               "gpu_memory_mib": {g: b // MiB for g, b in sorted(per_gpu.items())}}
        say(f"{label} engine {engine}: {len(pids)} processes, CUDA_VISIBLE_DEVICES "
            f"{report[str(engine)]['CUDA_VISIBLE_DEVICES']}, GPU memory (NVML, per process, "
            f"summed) {report[str(engine)]['gpu_memory_mib']} MiB; {report[str(engine)]['cmd']}")
    return report


def nvidia_smi() -> str:
    if shutil.which("nvidia-smi") is None:
        return "(no nvidia-smi)"
    done = subprocess.run(["nvidia-smi", "--query-gpu=index,name,uuid,memory.total,memory.used",
                           "--format=csv,noheader"], capture_output=True, text=True, timeout=60)
    return done.stdout.strip() or done.stderr.strip()


# --- a random-weight Llama in Hugging Face format (numpy, safetensors, tokenizers) -------------

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def write_model(directory: Path, *, hidden: int, layers: int, heads: int, kv_heads: int,
                intermediate: int, context: int) -> Path:
    import numpy as np
    from safetensors.numpy import save_file
    from tokenizers import Tokenizer, decoders, models, normalizers

    directory.mkdir(parents=True, exist_ok=True)
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + \
        ["▁hello", "▁there", "▁the", "▁a", "▁GPU", "▁mesh", "▁world"]
    tokenizer = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=[],
                                     unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"),
                                                 normalizers.Replace(" ", "▁")])
    tokenizer.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse(),
                                           decoders.Replace("▁", " "), decoders.Strip(" ", 1, 0)])
    tokenizer.add_special_tokens(["<unk>", "<s>", "</s>"])
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "model_max_length": context, "chat_template": CHAT_TEMPLATE}))
    vocab = 384                                   # padded past the tokenizer's 266
    head_dim = hidden // heads
    (directory / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": intermediate, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": head_dim,
        "max_position_embeddings": context, "vocab_size": vocab, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": False,
        "torch_dtype": "float16", "bos_token_id": 1, "eos_token_id": 2}))
    rng = np.random.default_rng(0)

    def rand(*shape: int) -> Any:
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float16)

    tensors = {"model.embed_tokens.weight": rand(vocab, hidden),
               "model.norm.weight": np.ones(hidden, dtype=np.float16),
               "lm_head.weight": rand(vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors |= {p + "input_layernorm.weight": np.ones(hidden, dtype=np.float16),
                    p + "post_attention_layernorm.weight": np.ones(hidden, dtype=np.float16),
                    p + "self_attn.q_proj.weight": rand(heads * head_dim, hidden),
                    p + "self_attn.k_proj.weight": rand(kv_heads * head_dim, hidden),
                    p + "self_attn.v_proj.weight": rand(kv_heads * head_dim, hidden),
                    p + "self_attn.o_proj.weight": rand(hidden, heads * head_dim),
                    p + "mlp.gate_proj.weight": rand(intermediate, hidden),
                    p + "mlp.up_proj.weight": rand(intermediate, hidden),
                    p + "mlp.down_proj.weight": rand(hidden, intermediate)}
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return directory


# --- the steps ---------------------------------------------------------------------------------

def deploy(daemon: Daemon, spec: dict[str, Any]) -> dict[str, Any]:
    status, body = http(daemon, "/api/models/evaluate", dict(spec))
    if status == 200:
        say(f"evaluate {spec['name']}: {json.dumps(body)[:1500]}")
        FIGURES.setdefault("evaluations", {})[spec["name"]] = body
    else:
        say(f"evaluate {spec['name']}: HTTP {status} {str(body)[:300]}")
    status, body = http(daemon, "/api/models", spec)
    if status != 201:
        raise RuntimeError(f"deploy {spec['name']}: HTTP {status} {body}")
    say(f"deployed {spec['name']}: estimate {json.dumps(body.get('estimate'))}")
    return body


def wait_running(daemon: Daemon, name: str, replicas: int, timeout: float) -> dict[str, Any]:
    started = time.monotonic()

    def ready() -> dict[str, Any] | None:
        status, model = http(daemon, f"/api/models/{name}")
        if status == 200 and model.get("ready_replicas", 0) >= replicas:
            return model
        if status == 200 and int(time.monotonic() - started) % 30 < 2:
            say(f"  {name}: {model.get('status')} "
                + "; ".join(f"{i['state']} {i.get('reason') or ''}"[:200] for i in model.get("instances", [])))
        return None

    model = wait_for(f"{name} running", ready, timeout)
    seconds = time.monotonic() - started
    FIGURES.setdefault("ready_s", {})[name] = round(seconds, 1)
    for instance in model["instances"]:
        say(f"{name} running after {seconds:.0f} s: instance {instance['id']} on node "
            f"{instance['node_id']} allocation {json.dumps(instance.get('allocation'))}")
    return model


def chat(daemon: Daemon, model: str) -> str:
    started = time.perf_counter()
    status, body = http(daemon, "/v1/chat/completions", {
        "model": model, "max_tokens": 12, "messages": [{"role": "user", "content": "hello"}]},
        timeout=120)
    seconds = time.perf_counter() - started
    if status != 200:
        raise RuntimeError(f"chat {model}: HTTP {status} {body}")
    text = body["choices"][0]["message"]["content"]
    say(f"chat {model} via {daemon.url}: {text!r} in {seconds * 1000:.0f} ms, usage {body.get('usage')}")
    FIGURES.setdefault("chat_ms", {}).setdefault(model, []).append(round(seconds * 1000))
    return text


def compare_memory(model: dict[str, Any], engines: dict[str, Any], label: str) -> None:
    """The engine's GPU memory (NVML) beside the booking the scheduler placed it with."""
    measured = sum(sum(e["gpu_memory_mib"].values()) for e in engines.values()) * MiB
    booked = 0
    for instance in model["instances"]:
        allocation = instance.get("allocation") or {}
        bookings = allocation.get("bookings")
        if bookings:
            booked += sum(b["memory_bytes"] for b in bookings)
        else:
            booked += allocation.get("memory_bytes", 0) * max(1, len(allocation.get("gpu_indices") or [1]))
    estimate = (model.get("estimate") or {}).get("total_bytes")
    ratio = measured / booked if booked else None
    say(f"{label}: GPU memory held {measured / GiB:.2f} GiB vs booked {booked / GiB:.2f} GiB "
        f"(estimate total {estimate and estimate / GiB:.2f} GiB): ratio {ratio and round(ratio, 3)}")
    FIGURES.setdefault("memory", {})[label] = {"held_bytes": measured, "booked_bytes": booked,
                                               "estimate_total_bytes": estimate, "ratio": ratio}


def telemetry_cost(daemon: Daemon, label: str) -> None:
    status, body = http(daemon, "/api/telemetry")
    if status != 200:
        raise RuntimeError(f"telemetry: HTTP {status} {body}")
    cost = body["sampler"]
    latest = body["latest"]
    say(f"{label} telemetry: {len(body['samples'])} samples kept, sampler {json.dumps(cost)}; "
        "latest GPUs " + ", ".join(f"{g['index']}: {g['memory_used_bytes'] // MiB} MiB used, "
                                   f"{g['utilization_percent']} %, {g['power_w']} W"
                                   for g in latest["gpus"]))
    FIGURES.setdefault("telemetry", {})[label] = cost


class Outsider:
    """A process gpumesh did not start, holding `gib` GiB on one GPU (or all but `leave_gib`)."""

    def __init__(self, gpu: int, gib: float | None, leave_gib: float = 4.0) -> None:
        size = (f"int({gib} * (1 << 30))" if gib is not None else
                f"torch.cuda.mem_get_info()[0] - int({leave_gib} * (1 << 30))")
        code = (f"import torch, sys; n = {size}; x = torch.empty(n, dtype=torch.uint8, "
                "device='cuda'); torch.cuda.synchronize(); print('held', n, flush=True); "
                "sys.stdin.read()")
        self.process = subprocess.Popen(
            [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            text=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": str(gpu)})
        line = self.process.stdout.readline().split() if self.process.stdout else []
        if not line or line[0] != "held":
            raise RuntimeError(f"the outsider could not hold its memory on GPU {gpu}")
        FIGURES["outsider_bytes"] = int(line[1])
        say(f"outsider pid {self.process.pid} holds {int(line[1]) / GiB:.1f} GiB on GPU {gpu}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.communicate("", timeout=60)
        say(f"outsider stopped (exit {self.process.returncode})")


def models_spec(root: Path, args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    if args.smoke:                       # the plumbing on a CPU machine: llama.cpp, tiny GGUF
        from tinymodels import write_tiny_gguf
        gguf = write_tiny_gguf(root / "tiny.gguf")
        return {"small": {"name": "small", "source": str(gguf), "backend": "llama.cpp"},
                "tp2": {"name": "tp2", "source": str(gguf), "backend": "llama.cpp"}}
    # Long contexts make the KV cache, which vLLM books up front, the bulk of each booking, so
    # the measured memory can be held against the estimate (a booking of a few hundred MB is
    # lost in vLLM's 1 %-of-the-card rounding and the CUDA context). "tp2" needs 2 M tokens of
    # KV (128 GiB): more than one H200 can give, so the scheduler must take two GPUs.
    small = write_model(root / "m-small", hidden=1024, layers=8, heads=16, kv_heads=8,
                        intermediate=2816, context=1 << 20)
    wide = write_model(root / "m-tp2", hidden=2048, layers=8, heads=16, kv_heads=16,
                       intermediate=5632, context=1 << 21)
    engine_args = ["--dtype", "bfloat16", "--enforce-eager", "--max-num-seqs", "16",
                   "--max-num-batched-tokens", "4096"]
    return {
        "small": {"name": "small", "source": str(small), "backend": args.backend, "replicas": 1,
                  "context_length": 1 << 20, "args": engine_args},
        "tp2": {"name": "tp2", "source": str(wide), "backend": args.backend, "replicas": 1,
                "context_length": 1 << 21, "args": engine_args},
    }


def phase_a(root: Path, args: argparse.Namespace) -> None:
    specs = models_spec(root, args)
    daemon = Daemon(root / "a-node", "--discovery", "off")
    step("a: gpumesh up (every GPU)", lambda: daemon.start(timeout=120))
    try:
        def inventory() -> None:
            node = http(daemon, "/api/nodes")[1]["data"][0]
            gpus = node["inventory"]["gpus"]
            say("node inventory:", json.dumps(node["inventory"]))
            say("nvidia-smi:", nvidia_smi())
            FIGURES["a_inventory"] = node["inventory"]
            FIGURES["a_backends"] = node.get("backends")
            say("node backends:", json.dumps(node.get("backends")))
            if not gpus and not args.smoke:
                raise RuntimeError("the node offers no GPU")
        step("a: inventory through nvidia-ml-py", inventory)
        step("a: deploy a one-GPU model and a tensor-parallel-2 model",
             lambda: [deploy(daemon, specs["small"]), deploy(daemon, specs["tp2"])])
        models = {}
        for name in ("tp2", "small"):
            models[name] = step(f"a: {name} running", lambda n=name: wait_running(
                daemon, n, 1, timeout=args.ready_timeout))
        for name in ("small", "tp2"):
            step(f"a: chat {name} through the gateway", lambda n=name: [chat(daemon, n) for _ in range(3)])
        engines = step("a: engines' CUDA_VISIBLE_DEVICES and GPU memory",
                       lambda: describe_engines(daemon, "a"))
        FIGURES["a_engines"] = engines
        if engines:
            for name, model in models.items():
                if not model:
                    continue
                pids = {i.get("pid") for i in model["instances"]}
                mine = {k: v for k, v in engines.items() if pids & set(v["pids"])}
                say(f"{name}: instance pids {sorted(p for p in pids if p)} -> engine groups {sorted(mine)}")
                step(f"a: {name} memory vs prediction", lambda m=model, e=mine, n=name:
                     compare_memory(m, e, n))
        step("a: telemetry cost", lambda: telemetry_cost(daemon, "a"))
    finally:
        say("a: daemon stop status", daemon.stop(timeout=120) if daemon.process else None)
        (root / "a-daemon.log").exists() and say("a: daemon log tail:\n" + daemon.output()[-4000:])


def phase_b(root: Path, args: argparse.Namespace) -> None:
    specs = models_spec(root, args)
    outsider = None if args.smoke else step("b: outsider holds GPU 0 but a few GiB",
                                            lambda: Outsider(0, None, args.outsider_leave_gib))
    gpus0, gpus1 = ([], []) if args.smoke else (["--gpus", "0"], ["--gpus", "1"])
    first = Daemon(root / "b-node0", *gpus0, "--node-name", "gpu0", "--discovery", "off")
    step("b: daemon 0 up (--gpus 0)", lambda: first.start(timeout=120))
    second = Daemon(root / "b-node1", *gpus1, "--node-name", "gpu1", "--discovery", "off")
    try:
        step("b: daemon 1 up (--gpus 1), joining daemon 0", lambda: join(second, first))
        step("b: two nodes ready", lambda: wait_for("two ready nodes", lambda: [
            (n["name"], [g["index"] for g in n["inventory"]["gpus"]],
             [g["memory_used_bytes"] // MiB for g in n["inventory"]["gpus"]])
            for n in http(first, "/api/nodes")[1]["data"] if n["status"] == "ready"]
            if len([n for n in http(first, "/api/nodes")[1]["data"] if n["status"] == "ready"]) >= 2
            else None, timeout=60))
        say("b: nodes", json.dumps([(n["name"], n["inventory"]["gpus"]) for n in
                                    http(first, "/api/nodes")[1]["data"]])[:3000])
        step("b: deploy one replica", lambda: deploy(first, specs["small"]))
        if args.smoke:
            say("smoke: no outsider, no --gpus")
        placed = step("b: the replica avoids the outsider's GPU", lambda: wait_running(
            first, "small", 1, timeout=args.ready_timeout))
        if placed:
            FIGURES["b_first_placement"] = [(i["node_id"], i.get("allocation")) for i in placed["instances"]]
        if outsider:
            step("b: outsider stops", outsider.stop)
        def gpu0_free_again() -> Any:
            for node in http(first, "/api/nodes")[1]["data"]:
                if node["name"] == "gpu0" and node["inventory"]["gpus"]:
                    used = node["inventory"]["gpus"][0]["memory_used_bytes"]
                    return used < 8 * GiB and used // MiB
            return None
        if not args.smoke:
            step("b: the heartbeat brings GPU 0's freed memory to the scheduler", lambda: say(
                "gpu0 used now (MiB):", wait_for("GPU 0 free in the node record", gpu0_free_again,
                                                  timeout=60, every=0.5)))
        step("b: scale to two replicas", lambda: http(first, "/api/models/small", {"replicas": 2},
                                                      method="PATCH"))
        spread = step("b: two replicas running", lambda: wait_running(
            first, "small", 2, timeout=args.ready_timeout))
        if spread:
            FIGURES["b_spread"] = [(i["node_id"], i.get("allocation")) for i in spread["instances"]]
        step("b: chat through either gateway", lambda: [chat(d, "small") for d in (first, second)
                                                         for _ in range(2)])
        for label, daemon in (("b0", first), ("b1", second)):
            FIGURES[f"{label}_engines"] = step(f"{label}: engines' CUDA_VISIBLE_DEVICES",
                                               lambda d=daemon, lab=label: describe_engines(d, lab))
        step("b: telemetry cost", lambda: [telemetry_cost(first, "b0"), telemetry_cost(second, "b1")])
    finally:
        for daemon in (second, first):
            if daemon.process is not None and daemon.process.poll() is None:
                say(f"{daemon.data_dir.name} stop status", daemon.stop(timeout=120))
            say(f"{daemon.data_dir.name} log tail:\n" + daemon.output()[-3000:])
        if outsider and outsider.process.poll() is None:
            outsider.stop()


def join(node: Daemon, founder: Daemon) -> None:
    """`gpumesh up --join` with a token the founder mints; the joiner uses the founder's key."""
    status, body = http(founder, "/api/join-tokens", {"ttl_s": 600})
    if status not in (200, 201):
        raise RuntimeError(f"join token: HTTP {status} {body}")
    node.key = founder.admin_key
    node.extra_args = (*node.extra_args, "--join", f"127.0.0.1:{founder.api_port}",
                       "--token", body["token"])
    node.start(timeout=120)
    node.extra_args = node.extra_args[:-4]        # a restart is a plain `gpumesh up`


def main() -> int:
    global LOG
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--work", default="/tmp/gpumesh-check")
    parser.add_argument("--phase", choices=("a", "b", "all"), default="all")
    parser.add_argument("--backend", default="vllm")
    parser.add_argument("--ready-timeout", type=float, default=420.0)
    parser.add_argument("--smoke", action="store_true",
                        help="no GPU: llama.cpp on the CPU, no outsider, no --gpus (plumbing only)")
    parser.add_argument("--outsider-leave-gib", type=float, default=4.0,
                        help="the outsider takes all of GPU 0's free memory but this much")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    LOG = open(out / "check.log", "a")
    root = Path(args.work)
    root.mkdir(parents=True, exist_ok=True)
    say("command:", " ".join(shlex.quote(a) for a in sys.argv))
    say("python", sys.version.split()[0], "cpus", os.cpu_count())
    for module in ("torch", "vllm", "pynvml", "gpumesh"):
        try:
            imported = __import__(module)
            say(module, getattr(imported, "__version__", "?"), getattr(imported, "__file__", ""))
        except Exception as exc:
            say(module, "not importable:", exc)
    say("nvidia-smi:", nvidia_smi())
    try:
        if args.phase in ("a", "all"):
            phase_a(root, args)
        if args.phase in ("b", "all"):
            phase_b(root, args)
    finally:
        save(out)
        say("steps:", json.dumps({k: v["ok"] for k, v in FIGURES["steps"].items()}))
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sys.exit(main())
