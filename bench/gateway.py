"""The gateway's cost, in one run: a stand-in OpenAI engine called directly, through a bare
aiohttp relay, and through gpumesh's gateway with auth, routing, limits, metering and metrics
on; non-streamed and streamed, 1 and 32 clients.

Each server runs in its own process (`--serve ROLE PORT`); this process is the load: a closed
loop of C concurrent clients sending N chat requests (bounded in count, and in time by a
deadline per round and one for the whole run). Rounds go path after path (engine, relay,
gateway, engine, …) so a burst of load from elsewhere hits every path alike; the median
round is shown. Per path: req/s and its ratio to the relay, p50 and what it adds to the
engine's, p99, and the server process's CPU time per request (from the kernel's per-thread
schedstat: steadier than throughput on a shared machine), and its ratio to the relay's.

The engine stands in for vLLM and SGLang: it keeps connections alive, streamed or not. A
second one behaves like llama.cpp and closes the connection after each streamed answer
(`Connection: close`): the streamed scenarios measure it separately (direct, through its own
bare relay, through the gateway, where it is a llama.cpp model: the gateway opens a fresh
connection per stream for it). The gateway under test is the daemon's own `http_app` on a
real single-node Raft store, called with a user key that has limits (so the limiter runs);
usage is folded into the state as in a daemon. Nothing but Python, aiohttp, msgpack and
gpumesh (with its dependencies) is needed: no engine, no GPU, no network.

Where the machine has a physical core for each process (the load, two engines, two relays,
the gateway), each is pinned to its own core, one hardware thread of it (`--pin off` to
leave it to the scheduler): a server that shares a core with the busy load process (SMT
siblings) or migrates runs slower per request, and which one it is varies run to run (on a
16-CPU host the gateway's and the relay's CPU per request swung ±20 % between runs).

Run: `python bench/gateway.py` (about a minute on 16 cores; `--quick` for a smoke run).
`--profile` runs the gateway under cProfile and prints its top functions at the end.
`--llama` adds a real llama.cpp engine (tiny model; needs the test extra), direct and through.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

CHAT = {"model": "bench", "messages": [{"role": "user", "content": "Say hello."}],
        "max_tokens": 16}
ANSWER = {"id": "chatcmpl-bench", "object": "chat.completion", "created": 1, "model": "bench",
          "choices": [{"index": 0, "finish_reason": "stop",
                       "message": {"role": "assistant", "content": "Hello! How can I help?"}}],
          "usage": {"prompt_tokens": 12, "completion_tokens": 8, "total_tokens": 20}}
STREAM_PIECES = ["Hello", "!", " How", " can", " I", " help", "?"]
DEADLINE_S = 30.0             # one round never runs longer than this


# --- the servers ---------------------------------------------------------------------------------

def engine_app(close_streams: bool = False) -> web.Application:
    """A stand-in OpenAI engine: a fixed answer, or a fixed stream of events (one write
    each, as an engine sends tokens). `close_streams`: close the connection after each
    streamed answer, as llama.cpp does (announced: `Connection: close`)."""
    body = json.dumps(ANSWER, separators=(",", ":")).encode()

    def event(obj: dict[str, Any]) -> bytes:
        return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"

    chunks = [event({"id": "chatcmpl-bench", "object": "chat.completion.chunk",
                     "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})]
    chunks += [event({"id": "chatcmpl-bench", "object": "chat.completion.chunk",
                      "choices": [{"index": 0, "delta": {"content": piece}}]})
               for piece in STREAM_PIECES]
    chunks.append(event({"id": "chatcmpl-bench", "object": "chat.completion.chunk",
                         "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}))
    usage_chunk = event({"id": "chatcmpl-bench", "object": "chat.completion.chunk",
                         "choices": [], "usage": ANSWER["usage"]})

    async def chat(request: web.Request) -> web.StreamResponse:
        payload = await request.json()
        if not payload.get("stream"):
            return web.Response(body=body, content_type="application/json")
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        if close_streams:
            response.force_close()
        await response.prepare(request)
        for chunk in chunks:
            await response.write(chunk)
        if (payload.get("stream_options") or {}).get("include_usage"):
            await response.write(usage_chunk)
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    return app


def relay_app(engine_url: str) -> web.Application:
    """The floor: pass the body to the engine and the answer back, nothing else."""
    async def session_ctx(app: web.Application):
        app[SESSION] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        yield
        await app[SESSION].close()

    async def relay(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        async with request.app[SESSION].post(engine_url + request.path, data=body, headers={
                "Content-Type": "application/json"}) as upstream:
            if not upstream.headers.get("Content-Type", "").startswith("text/event-stream"):
                return web.Response(status=upstream.status, body=await upstream.read(),
                                    content_type="application/json")
            response = web.StreamResponse(status=upstream.status,
                                          headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response

    app = web.Application()
    app.cleanup_ctx.append(session_ctx)
    app.router.add_post("/v1/chat/completions", relay)
    return app


SESSION = web.AppKey("session", aiohttp.ClientSession)


def write_stand_in_model(directory: Path) -> Path:
    """A model folder that deploys as a safetensors LLM (config.json and a 32-byte tensor),
    written by hand: the bench needs neither gguf nor numpy."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
        "intermediate_size": 128, "vocab_size": 256, "max_position_embeddings": 512}))
    header = json.dumps({"w": {"dtype": "F16", "shape": [4, 4],
                               "data_offsets": [0, 32]}}).encode()
    (directory / "model.safetensors").write_bytes(
        len(header).to_bytes(8, "little") + header + bytes(32))
    return directory


async def gateway_app(engine_port: int, closing_port: int, llama_port: int | None,
                      workdir: Path, keys_file: Path) -> web.Application:
    """gpumesh's own app on a real store: a limited user key, the stand-in engines as
    instances of a vLLM model ("bench") and a llama.cpp model ("bench-llama")."""
    from inprocess import instance_record, new_store

    from gpumesh.mesh.auth import ADMIN, new_api_key, new_user
    from gpumesh.mesh.daemon import http_app
    from gpumesh.mesh.deployments import build_model_record

    store = new_store(workdir)
    await store.start()
    await store.wait_ready(30)
    node_id = "bench-node"
    admin_key, record = new_api_key("admin", ADMIN, user="admin")
    await store.submit({"op": "create_api_key", "key": record, "only_if_no_admin": True,
                        "create_user": new_user("admin", ADMIN)})
    limits = {"rpm": 10**9, "tpm": 10**12, "concurrency": 10**6}
    await store.submit({"op": "create_user", "user": new_user("bench", "user", limits)})
    user_key, record = new_api_key("bench", "user", user="bench", limits=limits)
    await store.submit({"op": "create_api_key", "key": record})
    await store.submit({"op": "upsert_node", "node": {"id": node_id, "name": node_id,
                                                      "status": "ready", "api_url": ""}})
    source = str(write_stand_in_model(workdir / "stand-in-model"))
    models = [("bench", engine_port, "vllm"), ("bench-llama", closing_port, "llama.cpp")]
    if llama_port:
        models.append(("tiny", llama_port, "llama.cpp"))
    for name, port, backend in models:
        model = build_model_record({"name": name, "source": source, "replicas": 1})
        # Routing reads the backend for one thing: whether the engine keeps a connection
        # after a stream (vLLM, SGLang) or closes it (llama.cpp).
        model["backend"] = backend
        await store.submit({"op": "create_model", "model": model})
        await store.submit({"op": "create_instance", "instance": instance_record(
            f"{name}-1", name, "running", node_id, port=port)})
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=None),
                                    timeout=aiohttp.ClientTimeout(total=None, sock_connect=5))
    app = http_app(store, node_id, session, time.time(), lambda: [],
                   cluster_secret="bench-cluster-secret-0123456789")

    async def owned(app: web.Application):
        yield
        await session.close()
        await store.stop()
    app.cleanup_ctx.insert(0, owned)
    keys_file.write_text(json.dumps({"user": user_key, "admin": admin_key}))
    return app


def physical_cores() -> list[int]:
    """One logical CPU per physical core this process may run on (the lowest-numbered
    hardware thread of each), in order."""
    chosen: dict[tuple[str, str], int] = {}
    for cpu in sorted(os.sched_getaffinity(0)):
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            core = ((topology / "physical_package_id").read_text().strip(),
                    (topology / "core_id").read_text().strip())
        except OSError:
            core = ("?", str(cpu))           # no topology: each CPU its own core
        chosen.setdefault(core, cpu)
    return list(chosen.values())


CPU_ENV = "GPUMESH_BENCH_CPU"     # the logical CPU a server process pins itself to


def serve(role: str, port: int, engine_port: int, closing_port: int, llama_port: int,
          workdir: Path, profile: bool) -> None:
    if os.environ.get(CPU_ENV):
        os.sched_setaffinity(0, {int(os.environ[CPU_ENV])})    # its threads inherit it

    async def main() -> None:
        if role == "engine":
            app = engine_app()
        elif role == "closing-engine":
            app = engine_app(close_streams=True)
        elif role == "relay":
            app = relay_app(f"http://127.0.0.1:{engine_port}")
        else:
            app = await gateway_app(engine_port, closing_port, llama_port or None, workdir,
                                    workdir / "keys.json")
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        if role == "gateway":
            from gpumesh.mesh.daemon import freeze_startup_heap
            freeze_startup_heap()            # as the daemon does once it has started
        print("ready", flush=True)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        await runner.cleanup()

    if not profile:
        asyncio.run(main())
        return
    import cProfile
    import pstats
    profiler = cProfile.Profile()
    profiler.enable()
    asyncio.run(main())
    profiler.disable()
    if os.environ.get("PROFILE_OUT"):
        profiler.dump_stats(f"{os.environ['PROFILE_OUT']}.{role}")
    stats = pstats.Stats(profiler, stream=sys.stderr)
    stats.sort_stats(os.environ.get("PROFILE_SORT", "tottime")).print_stats(
        os.environ.get("PROFILE_FILTER", ""), int(os.environ.get("PROFILE_N", "25")))


class Server:
    """One server process (`--serve ROLE PORT`), started and ready."""

    def __init__(self, role: str, *, engine_port: int = 0, closing_port: int = 0,
                 llama_port: int = 0, workdir: Path | None = None,
                 profile: bool = False, cpu: int | None = None) -> None:
        from harness import free_port
        self.role = role
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        argv = [sys.executable, __file__, "--serve", role, str(self.port),
                "--engine-port", str(engine_port), "--closing-port", str(closing_port),
                "--llama-port", str(llama_port),
                "--workdir", str(workdir or tempfile.gettempdir())]
        if profile:
            argv.append("--profile")
        # Its stderr goes to a file (a pipe nobody reads could fill and stall it): shown when
        # it fails to start, and the profile is read from it at the end.
        self.stderr = tempfile.TemporaryFile(mode="w+", prefix=f"gpumesh-bench-{role}-")
        env = {**os.environ, CPU_ENV: str(cpu) if cpu is not None else ""}
        self.process = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True,
                                        stderr=self.stderr, env=env)
        line = self.process.stdout.readline() if self.process.stdout else ""
        if line.strip() != "ready":
            self.process.kill()
            self.process.wait()
            raise RuntimeError(f"{role} did not start (exit {self.process.returncode}):\n"
                               + self.errors(4000))

    def errors(self, tail: int) -> str:
        """The end of what the server wrote to stderr."""
        self.stderr.seek(0)
        return self.stderr.read()[-tail:]

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


# --- the load ------------------------------------------------------------------------------------

async def load(url: str, clients: int, requests: int, stream: bool, key: str | None,
               model: str = "bench", pid: int | None = None,
               deadline: float = float("inf"), close: bool = False) -> dict[str, float]:
    """A closed loop: `clients` workers share `requests` requests (until `deadline`, a
    time.perf_counter() value); latencies in ms, and the CPU time process `pid` spent per
    request while they ran (after a short warm-up that opens the clients' connections,
    which neither figure counts). `close`: a connection per request (a real llama.cpp closes
    streamed ones after announcing keep-alive: a pooled one would be stale)."""
    body = json.dumps({**CHAT, "model": model, "stream": stream}).encode()
    headers = {"Content-Type": "application/json"}
    if close:
        headers["Connection"] = "close"
    if key:
        headers["Authorization"] = f"Bearer {key}"
    latencies: list[float] = []
    errors = 0
    left = 0
    deadline = min(deadline, time.perf_counter() + DEADLINE_S)

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal left, errors
        while left > 0 and time.perf_counter() < deadline:
            left -= 1
            started = time.perf_counter()
            async with session.post(url + "/v1/chat/completions", data=body,
                                    headers=headers) as reply:
                await reply.read()
                if reply.status != 200:
                    errors += 1
            latencies.append((time.perf_counter() - started) * 1000)

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        left = min(requests, max(2 * clients, 30))            # warm-up
        await asyncio.gather(*(worker(session) for _ in range(clients)))
        latencies.clear()
        errors = 0
        left = requests
        cpu_before = cpu_seconds(pid) if pid else 0.0
        started = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(clients)))
        elapsed = time.perf_counter() - started
        cpu = cpu_seconds(pid) - cpu_before if pid else None
    if not latencies:
        return {"rps": 0.0, "p50": float("nan"), "p99": float("nan"), "errors": errors,
                "n": 0}
    ordered = sorted(latencies)
    result = {"rps": len(latencies) / elapsed, "p50": statistics.median(ordered),
              "p99": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))],
              "errors": errors, "n": len(latencies)}
    if cpu is not None:
        result["cpu_us"] = cpu / len(latencies) * 1e6
    return result


def cpu_seconds(pid: int) -> float:
    """CPU time of process `pid`, all its threads: nanoseconds from each thread's schedstat
    where the kernel has them (a clock tick, 10 ms, is coarse for a few hundred requests),
    else user + system ticks from /proc/PID/stat."""
    try:
        return sum(int((task / "schedstat").read_text().split()[0])
                   for task in Path(f"/proc/{pid}/task").iterdir()) / 1e9
    except (OSError, ValueError, IndexError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Row:
    """One way to the engine, a row of the tables."""
    name: str
    server: "Server"
    key: str | None
    model: str
    relay: str            # the row this one is compared with (its bare relay)
    engine: str           # the row whose p50 it adds to
    close_streams: bool = False   # ask for a connection per stream (see load)


def interleaved(paths: list[Row], clients: int, requests: int, stream: bool, rounds: int,
                deadline: float) -> dict[str, dict[str, float]]:
    """Each path's median round: rounds go path after path (engine, relay, gateway, engine,
    …) so that a burst of load from elsewhere on the machine hits all paths alike."""
    runs: dict[str, list[dict[str, float]]] = {path.name: [] for path in paths}
    for _ in range(rounds):
        for path in paths:
            runs[path.name].append(asyncio.run(load(
                path.server.url, clients, requests, stream, path.key, path.model,
                pid=path.server.process.pid, deadline=deadline,
                close=stream and path.close_streams)))
    return {name: median_round(results) for name, results in runs.items()}


def median_round(results: list[dict[str, float]]) -> dict[str, float]:
    """The median round by throughput, with the median CPU per request of all rounds."""
    median = dict(sorted(results, key=lambda r: r["rps"])[len(results) // 2])
    if all("cpu_us" in r for r in results):
        median["cpu_us"] = statistics.median(r["cpu_us"] for r in results)
    return median


def table(paths: list[Row], results: dict[str, dict[str, float]]) -> str:
    lines = [f"  {'path':<36} {'req/s':>7} {'x relay':>7} {'p50 ms':>7} {'+p50 ms':>7} "
             f"{'p99 ms':>7} {'CPU us/req':>10} {'x relay':>7} {'n':>5} {'err':>4}"]
    for path in paths:
        r, relay, engine = results[path.name], results[path.relay], results[path.engine]
        ratio = r["rps"] / relay["rps"] if relay["rps"] else float("nan")
        cpu = r.get("cpu_us", float("nan"))
        cpu_ratio = cpu / relay["cpu_us"] if "cpu_us" in relay else float("nan")
        added = r["p50"] - engine["p50"]
        lines.append(f"  {path.name:<36} {r['rps']:>7.0f} {ratio:>7.2f} {r['p50']:>7.2f} "
                     f"{added:>+7.2f} {r['p99']:>7.2f} {cpu:>10.0f} {cpu_ratio:>7.2f} "
                     f"{r['n']:>5.0f} {r['errors']:>4.0f}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--serve", nargs=2, metavar=("ROLE", "PORT"), help=argparse.SUPPRESS)
    parser.add_argument("--engine-port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--closing-port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--llama-port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--requests-1", type=int, default=400,
                        help="requests per round for 1 client (default 400)")
    parser.add_argument("--requests-32", type=int, default=2000,
                        help="requests per round for 32 clients (default 2000)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds per figure; the median round is shown (default 3)")
    parser.add_argument("--budget", type=float, default=150.0,
                        help="seconds for all the load; later rounds stop early (default 150)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: 100 / 300 requests, one round")
    parser.add_argument("--profile", action="store_true", help="profile the gateway process")
    parser.add_argument("--scenarios", default="plain-1,plain-32,streamed-1,streamed-32",
                        help="which to run (default: all four)")
    parser.add_argument("--llama", action="store_true",
                        help="also a real llama.cpp engine (tiny model), direct and through")
    parser.add_argument("--pin", choices=("auto", "off"), default="auto",
                        help="auto (default): a physical core per process where there are "
                             "enough; off: leave placement to the scheduler")
    args = parser.parse_args()
    if args.serve:
        serve(args.serve[0], int(args.serve[1]), args.engine_port, args.closing_port,
              args.llama_port, Path(args.workdir), args.profile)
        return 0
    if args.quick:
        args.requests_1, args.requests_32, args.rounds = 100, 300, 1

    workdir = Path(tempfile.mkdtemp(prefix="gpumesh-bench-gateway-"))
    cores = physical_cores() if args.pin == "auto" else []
    # The load, the two engines, the two relays, the gateway: a core each, or no pinning.
    pins: list[int | None] = list(cores[:6]) if len(cores) >= 6 else [None] * 6
    if pins[0] is not None:
        os.sched_setaffinity(0, {pins[0]})
    servers: list[Server] = []
    llama = None
    gateway: Server | None = None
    try:
        engine = Server("engine", cpu=pins[1])
        servers.append(engine)
        closing = Server("closing-engine", cpu=pins[2])
        servers.append(closing)
        llama_port = 0
        if args.llama:
            from gateway_fixtures import LlamaEngine
            from tinymodels import write_tiny_gguf
            llama = LlamaEngine(write_tiny_gguf(workdir / "llama.gguf"), workdir / "llama.log",
                                "-np", "4")
            llama.wait_healthy()
            llama_port = llama.port
        relay = Server("relay", engine_port=engine.port, cpu=pins[3])
        servers.append(relay)
        closing_relay = Server("relay", engine_port=closing.port, cpu=pins[4])
        servers.append(closing_relay)
        gateway = Server("gateway", engine_port=engine.port, closing_port=closing.port,
                         llama_port=llama_port, workdir=workdir, profile=args.profile,
                         cpu=pins[5])
        servers.append(gateway)
        keys = json.loads((workdir / "keys.json").read_text())
        user_key = keys["user"]
        print(f"gpumesh gateway bench · {os.cpu_count()} CPUs · load "
              f"{os.getloadavg()[0]:.1f} · a process per server and one for the load · "
              f"{args.rounds} round(s) per figure, the median shown · "
              + (f"pinned: load, engines, relays, gateway on CPUs {pins} (a core each)\n"
                 if pins[0] is not None else "not pinned\n")
              + "x relay: throughput (or CPU per request) over the bare relay's; +p50: what "
              "the path adds to the engine's own p50\n")
        deadline = time.perf_counter() + args.budget
        keeping = [Row("engine direct", engine, None, "bench", "bare aiohttp relay",
                         "engine direct"),
                   Row("bare aiohttp relay", relay, None, "bench", "bare aiohttp relay",
                         "engine direct"),
                   Row("gpumesh gateway", gateway, user_key, "bench", "bare aiohttp relay",
                         "engine direct")]
        closing_paths = [
            Row("llama.cpp-style engine direct", closing, None, "bench",
                  "llama.cpp-style bare relay", "llama.cpp-style engine direct"),
            Row("llama.cpp-style bare relay", closing_relay, None, "bench",
                  "llama.cpp-style bare relay", "llama.cpp-style engine direct"),
            Row("llama.cpp-style gateway", gateway, user_key, "bench-llama",
                  "llama.cpp-style bare relay", "llama.cpp-style engine direct")]
        summary: list[str] = []
        for stream in (False, True):
            for clients, requests in ((1, args.requests_1), (32, args.requests_32)):
                scenario = f"{'streamed' if stream else 'plain'}-{clients}"
                if scenario not in args.scenarios.split(","):
                    continue
                paths = keeping + (closing_paths if stream else [])
                results = interleaved(paths, clients, requests, stream, args.rounds, deadline)
                print(f"{'streamed' if stream else 'non-streamed'}, {clients} client(s), "
                      f"up to {requests} requests per round")
                print(table(paths, results) + "\n", flush=True)
                gate, relay_r = results["gpumesh gateway"], results["bare aiohttp relay"]
                ratio = gate["rps"] / relay_r["rps"] if relay_r["rps"] else float("nan")
                line = (f"  {scenario:<12} throughput {ratio:.2f} of the relay "
                        f"({'meets' if ratio >= 0.8 else 'MISSES'} >= 0.8)")
                if clients == 1:
                    added = gate["p50"] - results["engine direct"]["p50"]
                    line += (f"; added p50 {added:+.2f} ms over the engine "
                             f"({'meets' if added <= 0.7 else 'MISSES'} <= 0.7 ms)")
                summary.append(line)
        if summary:
            print("goals (gateway with auth, routing, limits, metering, metrics; "
                  "vLLM-style engine):")
            print("\n".join(summary) + "\n")
        if llama is not None:
            real = [Row("llama.cpp direct", llama, None, "tiny", "llama.cpp direct",
                        "llama.cpp direct", close_streams=True),
                    Row("llama.cpp via gateway", gateway, user_key, "tiny",
                          "llama.cpp direct", "llama.cpp direct")]
            for stream in (False, True):
                results = interleaved(real, 4, 200, stream, args.rounds, float("inf"))
                print(f"a real llama.cpp engine (tiny model, 16 tokens), 4 clients, "
                      f"{'streamed' if stream else 'non-streamed'} (x relay: over direct)")
                print(table(real, results) + "\n")
    finally:
        for server in reversed(servers):
            server.stop()
        if llama is not None:
            llama.stop()
        if args.profile and gateway is not None:
            print(gateway.errors(200_000), file=sys.stderr)      # cProfile's table
    return 0


if __name__ == "__main__":
    sys.exit(main())
