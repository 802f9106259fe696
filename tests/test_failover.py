"""Mid-stream failover: the engine serving a stream is killed after the client got its first
bytes, and another replica continues the same answer (gateway/failover.py).

Two real llama.cpp engines serve one model. A logit bias makes every token the byte "x"
and EOS is ignored, so an answer of N tokens is exactly N x's whoever writes them: the
client must see one stream (one id, one role event, one end) with exactly N x's although
the engine that began it died part-way.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from gateway_fixtures import LlamaEngine, add_model, bootstrap, engine_that_dies, start_engines
from inprocess import InProcessNode, node_secret, raft_threads
from tinymodels import write_tiny_gguf

from gpumesh.mesh.auth import engine_key

NODE = "node-failover"
TOKENS = 2500
ONLY_X = {"logit_bias": {"123": 100}, "ignore_eos": True, "temperature": 0}


def dies_after_one_completion_event() -> web.Application:
    """A completions engine that streams one token ("x", one event as engines stream them),
    then its connection drops."""
    return engine_that_dies("/v1/completions", pause_s=0.05, sends=(
        b'data: {"id":"cmpl-first","object":"text_completion","created":7,"model":"tiny",'
        b'"choices":[{"index":0,"text":"x","finish_reason":null}]}\n\n'))


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):
    workdir = tmp_path_factory.mktemp("failover")
    gguf = write_tiny_gguf(workdir / "tiny.gguf", context_length=4096)
    engines = {i: LlamaEngine(gguf, workdir / f"engine-{i}.log", "-np", "1",
                              api_key=engine_key(node_secret(NODE), f"tiny-{i}"), context=4096)
               for i in (1, 2)}
    live = LlamaEngine(gguf, workdir / "engine-live.log",
                       api_key=engine_key(node_secret(NODE), "half-b-live"))
    node = InProcessNode(workdir / "raft", (NODE,))
    try:
        node.start()
        start_engines(*engines.values(), live)
        node.admin = bootstrap(node)
        add_model(node, "tiny", gguf, [(f"tiny-{i}", NODE, e.port) for i, e in engines.items()])
        add_model(node, "half", gguf, [("half-a-dying", NODE, node.serve(
            dies_after_one_completion_event())), ("half-b-live", NODE, live.port)])
        yield node, engines
    finally:
        node.stop()
        for engine in (*engines.values(), live):
            engine.stop()
    assert raft_threads() == []


async def stream(node: InProcessNode, path: str, body: dict[str, Any],
                 on_first_chunk: Any = None) -> tuple[list[dict[str, Any]], list[str], str]:
    """The events of one streamed answer, the raw event lines, and the answering instance."""
    raw = b""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        async with session.post(node.url + path, json={**body, "stream": True},
                                headers={"Authorization": f"Bearer {node.admin}"}) as reply:
            assert reply.status == 200
            instance = reply.headers["X-Gpumesh-Instance"]
            async for chunk in reply.content.iter_any():
                if not raw and on_first_chunk is not None:
                    on_first_chunk(instance)
                raw += chunk
    lines = [e for e in raw.decode().split("\n\n") if e]
    assert lines[-1] == "data: [DONE]", lines[-3:]
    return [json.loads(e[6:]) for e in lines[:-1]], lines, instance


def test_a_killed_engine_s_stream_is_continued_by_the_other_replica(setup, caplog) -> None:
    node, engines = setup
    killed: list[str] = []

    def kill(instance: str) -> None:        # the client has bytes: the engine dies now
        engines[int(instance.rsplit("-", 1)[1])].kill()
        killed.append(instance)

    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="gpumesh.gateway"):
        events, lines, first = asyncio.run(stream(node, "/v1/chat/completions", {
            "model": "tiny", "messages": [{"role": "user", "content": "x please"}],
            "max_tokens": TOKENS, **ONLY_X}, on_first_chunk=kill))
    assert killed == [first]
    continued = [r.getMessage() for r in caplog.records if "continuing it on" in r.getMessage()]
    assert len(continued) == 1 and f"instance {first} broke after" in continued[0], continued
    sent_before = int(continued[0].split(" after ")[1].split()[0])
    assert 0 <= sent_before < TOKENS                  # it died part-way through
    # One answer: one id, the role once, the finish once at the end, and every token.
    assert len({e["id"] for e in events}) == 1
    roles = [e for e in events if e["choices"] and "role" in e["choices"][0]["delta"]]
    assert len(roles) == 1 and roles[0] is events[0]
    finishes = [e["choices"][0]["finish_reason"] for e in events if e["choices"]]
    assert finishes[-1] == "length" and all(f is None for f in finishes[:-1])
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
    assert text == "x" * TOKENS
    assert time.monotonic() - started < 60


def test_a_completion_stream_is_continued_from_its_text(setup, caplog) -> None:
    """The first instance sends "x" and drops; the live one continues the prompt + "x"."""
    node, _ = setup
    with caplog.at_level(logging.WARNING, logger="gpumesh.gateway"):
        events, _, first = asyncio.run(stream(node, "/v1/completions", {
            "model": "half", "prompt": "x please", "max_tokens": 20, **ONLY_X,
            "stream_options": {"include_usage": True}}))
    assert first == "half-a-dying"
    assert {e["id"] for e in events} == {"cmpl-first"} and {e["created"] for e in events} == {7}
    assert "".join(c["text"] for e in events for c in e["choices"]) == "x" * 20
    usage = [e["usage"] for e in events if e.get("usage")]
    assert len(usage) == 1 and usage[0]["completion_tokens"] == 20    # 1 sent + 19 continued
    assert any("continuing it on half-b-live" in r.getMessage() for r in caplog.records)
