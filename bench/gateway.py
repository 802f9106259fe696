"""The gateway's cost, in one run: a fake OpenAI engine called directly, through a bare aiohttp
relay, and through gpumesh's gateway with auth, routing, limits, metering and metrics on.

Each server runs in its own process (`--serve engine|relay|gateway PORT`); this process is
the load: a closed loop of C concurrent clients sending N chat requests (bounded in count,
and in time by a deadline), non-streamed and streamed. It prints req/s, p50 and p99 per
path, the gateway's share of the relay's throughput and the p50 it adds.

The gateway under test is the daemon's own `http_app` on a real single-node Raft store, called
with a user key that has limits (so the limiter runs) on a model whose instance is the fake
engine: the fold of usage into the state runs as in a daemon. Streams go over pooled
connections (the engine keeps them, as vLLM and SGLang do); the row "gateway, llama.cpp
streams" routes the same engine as a llama.cpp model: each stream on a fresh connection
(`Connection: close`), as the gateway does for llama.cpp, which closes them. `--llama`
adds a real llama.cpp engine (tiny model), direct and through the gateway.

Run: `.venv/bin/python bench/gateway.py [--requests-1 400] [--requests-32 2000] [--profile]`.
`--profile` runs the gateway under cProfile and prints its top functions at the end.
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
DEADLINE_S = 120.0            # one scenario never runs longer than this


# --- the servers ---------------------------------------------------------------------------------

def engine_app() -> web.Application:
    """A fake OpenAI engine: a fixed answer, or a fixed stream of events (one write each)."""
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


async def gateway_app(engine_port: int, llama_port: int | None, workdir: Path,
                      keys_file: Path) -> web.Application:
    """gpumesh's own app on a real store: a limited user key, the fake engine as an instance."""
    from inprocess import instance_record, new_store
    from tinymodels import write_tiny_gguf

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
    gguf = write_tiny_gguf(workdir / "tiny.gguf")
    models = [("bench", engine_port, None), ("bench-llama", engine_port, "llama.cpp")]
    if llama_port:
        models.append(("tiny", llama_port, "llama.cpp"))
    for name, port, backend in models:
        model = build_model_record({"name": name, "source": str(gguf), "replicas": 1})
        # "bench" stands for an engine that keeps connections (vLLM, SGLang); "bench-llama"
        # for llama.cpp, which closes a connection after each stream.
        model["backend"] = backend or "vllm"
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


def serve(role: str, port: int, engine_port: int, llama_port: int, workdir: Path,
          profile: bool) -> None:
    async def main() -> None:
        if role == "engine":
            app = engine_app()
        elif role == "relay":
            app = relay_app(f"http://127.0.0.1:{engine_port}")
        else:
            app = await gateway_app(engine_port, llama_port or None, workdir,
                                    workdir / "keys.json")
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
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
    stats = pstats.Stats(profiler, stream=sys.stderr)
    stats.sort_stats(os.environ.get("PROFILE_SORT", "tottime")).print_stats(os.environ.get("PROFILE_FILTER", ""), int(os.environ.get("PROFILE_N", "25")))


class Server:
    def __init__(self, role: str, *, engine_port: int = 0, llama_port: int = 0,
                 workdir: Path | None = None, profile: bool = False) -> None:
        from harness import free_port
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.workdir = workdir
        argv = [sys.executable, __file__, "--serve", role, str(self.port),
                "--engine-port", str(engine_port), "--llama-port", str(llama_port),
                "--workdir", str(workdir or tempfile.gettempdir())]
        if profile:
            argv.append("--profile")
        self.process = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True,
                                        stderr=None if profile else subprocess.DEVNULL)
        line = self.process.stdout.readline() if self.process.stdout else ""
        if line.strip() != "ready":
            raise RuntimeError(f"{role} did not start")

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()


# --- the load ------------------------------------------------------------------------------------

async def load(url: str, clients: int, requests: int, stream: bool, key: str | None,
               model: str = "bench", close: bool = False) -> dict[str, float]:
    """A closed loop: `clients` workers share `requests` requests; latencies in ms.
    `close`: a connection per request (llama.cpp closes streamed ones anyway)."""
    body = json.dumps({**CHAT, "model": model, "stream": stream}).encode()
    headers = {"Content-Type": "application/json"}
    if close:
        headers["Connection"] = "close"
    if key:
        headers["Authorization"] = f"Bearer {key}"
    latencies: list[float] = []
    errors = 0
    left = requests
    deadline = time.perf_counter() + DEADLINE_S

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
        await asyncio.gather(*(worker(session) for _ in range(min(clients, 4))))   # warm up
        latencies.clear()
        left = requests
        started = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(clients)))
        elapsed = time.perf_counter() - started
    ordered = sorted(latencies)
    return {"rps": len(latencies) / elapsed, "p50": statistics.median(ordered),
            "mean": statistics.fmean(ordered),
            "p99": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))],
            "errors": errors, "n": len(latencies)}


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measured(server: "Server | None", url: str, clients: int, requests: int, stream: bool,
             key: str | None, model: str, rounds: int, close: bool = False) -> dict[str, float]:
    """The median round of `rounds` (this machine is shared: single runs are noisy), with
    the server process's CPU time per request, which noise on wall-clock time spares."""
    results = []
    for _ in range(rounds):
        before = cpu_seconds(server.process.pid) if server else 0.0
        result = asyncio.run(load(url, clients, requests, stream, key, model, close))
        if server:
            result["cpu_us"] = (cpu_seconds(server.process.pid) - before) / result["n"] * 1e6
        results.append(result)
    return sorted(results, key=lambda r: r["rps"])[len(results) // 2]


def table(rows: list[tuple[str, dict[str, float]]]) -> str:
    lines = [f"{'path':<34} {'req/s':>8} {'p50 ms':>8} {'mean ms':>8} {'p99 ms':>8} "
             f"{'CPU us/req':>10} {'errors':>6}"]
    for name, r in rows:
        cpu = f"{r['cpu_us']:>10.0f}" if "cpu_us" in r else f"{'-':>10}"
        lines.append(f"{name:<34} {r['rps']:>8.0f} {r['p50']:>8.2f} {r['mean']:>8.2f} "
                     f"{r['p99']:>8.2f} {cpu} {r['errors']:>6.0f}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--serve", nargs=2, metavar=("ROLE", "PORT"), help=argparse.SUPPRESS)
    parser.add_argument("--engine-port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--llama-port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--requests-1", type=int, default=400, help="requests for 1 client")
    parser.add_argument("--requests-32", type=int, default=2000, help="requests for 32 clients")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds per figure; the median round is shown (default 3)")
    parser.add_argument("--profile", action="store_true", help="profile the gateway process")
    parser.add_argument("--llama", action="store_true",
                        help="also a real llama.cpp engine (tiny model), direct and through")
    args = parser.parse_args()
    if args.serve:
        serve(args.serve[0], int(args.serve[1]), args.engine_port, args.llama_port,
              Path(args.workdir), args.profile)
        return 0

    workdir = Path(tempfile.mkdtemp(prefix="gpumesh-bench-gateway-"))
    servers: list[Server] = []
    llama = None
    try:
        engine = Server("engine")
        servers.append(engine)
        llama_port = 0
        if args.llama:
            from gateway_fixtures import LlamaEngine
            from tinymodels import write_tiny_gguf
            llama = LlamaEngine(write_tiny_gguf(workdir / "llama.gguf"), workdir / "llama.log",
                                "-np", "4")
            llama.wait_healthy()
            llama_port = llama.port
        relay = Server("relay", engine_port=engine.port)
        servers.append(relay)
        gateway = Server("gateway", engine_port=engine.port, llama_port=llama_port,
                         workdir=workdir, profile=args.profile)
        servers.append(gateway)
        keys = json.loads((workdir / "keys.json").read_text())
        print(f"gpumesh gateway bench · {os.cpu_count()} CPUs · load "
              f"{os.getloadavg()[0]:.1f} · one process per server and one for the load\n")
        results: dict[tuple[str, int, bool], dict[str, float]] = {}
        for stream in (False, True):
            for clients, requests in ((1, args.requests_1), (32, args.requests_32)):
                rows = []
                for name, server, key, model in (
                        ("engine direct", engine, None, "bench"),
                        ("bare aiohttp relay", relay, None, "bench"),
                        ("gpumesh gateway", gateway, keys["user"], "bench"),
                        ("gpumesh gateway, llama.cpp-style", gateway, keys["user"],
                         "bench-llama")):
                    if model == "bench-llama" and not stream:
                        continue
                    result = measured(server, server.url, clients, requests, stream, key,
                                      model, args.rounds)
                    results[(name, clients, stream)] = result
                    rows.append((name, result))
                print(f"{'streamed' if stream else 'non-streamed'}, {clients} client(s), "
                      f"{requests} requests")
                print(table(rows))
                relay_r = results[("bare aiohttp relay", clients, stream)]
                gate_r = results[("gpumesh gateway", clients, stream)]
                engine_r = results[("engine direct", clients, stream)]
                print(f"  gateway / relay: throughput {gate_r['rps'] / relay_r['rps']:.2f}, "
                      f"CPU per request {gate_r['cpu_us'] / relay_r['cpu_us']:.2f}; "
                      f"added p50 vs relay {gate_r['p50'] - relay_r['p50']:+.2f} ms, "
                      f"vs engine {gate_r['p50'] - engine_r['p50']:+.2f} ms\n")
        if llama is not None:
            rows = []
            for stream in (False, True):
                for name, server, url, key in (
                        ("llama.cpp direct", None, llama.url, None),
                        ("llama.cpp via gateway", gateway, gateway.url, keys["user"])):
                    result = measured(server, url, 4, 200, stream, key, "tiny", args.rounds,
                                      close=stream and server is None)
                    rows.append((f"{name}{', streamed' if stream else ''}", result))
            print("a real llama.cpp engine (tiny model, 16 tokens), 4 clients, 200 requests")
            print(table(rows) + "\n")
    finally:
        for server in reversed(servers):
            server.stop()
        if llama is not None:
            llama.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
