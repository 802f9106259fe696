"""Metering: what each key used, as the engines reported it, folded into the replicated
state in batches, readable through `GET /api/usage` and `gpumesh usage`.

A real llama.cpp engine answers (a grammar pins its output, so two identical requests
report identical usage); the node is in-process on a real Raft store.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import openai
import pytest
from gateway_fixtures import (CHAT, GRAMMAR, LlamaEngine, add_model, api_call, bootstrap,
                              start_engines)
from inprocess import InProcessNode, new_store, node_secret, raft_threads
from tinymodels import write_tiny_gguf

from gpumesh.mesh.auth import Principal, engine_key
from gpumesh.mesh.cli import main as cli_main
from gpumesh.mesh.commands import apply_command, empty_state
from gpumesh.mesh.limits import Limiter
from gpumesh.mesh.metering import Meter

NODE = "node-metering"
FOLD_WAIT_S = 10.0
# Token 123 is the byte "x" in the tiny vocabulary: with this bias and EOS ignored, the engine
# writes exactly max_tokens tokens, so a stream's usage is known without seeing it.
ONLY_X = {"logit_bias": {"123": 100}, "ignore_eos": True}


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory):
    workdir = tmp_path_factory.mktemp("metering")
    gguf = write_tiny_gguf(workdir / "tiny.gguf")
    engine = LlamaEngine(gguf, workdir / "engine.log",
                         api_key=engine_key(node_secret(NODE), "tiny-1"))
    node = InProcessNode(workdir / "raft", (NODE,))
    try:
        node.start()
        start_engines(engine)
        node.admin = bootstrap(node)
        add_model(node, "tiny", gguf, [("tiny-1", NODE, engine.port)])
        assert api_call(node.url + "/api/users", "POST", node.admin,
                        {"name": "ann"}).status == 201
        node.keys = [api_call(node.url + "/api/keys", "POST", node.admin,
                              {"user": "ann", "name": f"k{i}"}).body for i in (1, 2)]
        yield node
    finally:
        node.stop()
        engine.stop()
    assert raft_threads() == []


def usage(node: InProcessNode, query: str) -> dict[str, Any]:
    reply = api_call(node.url + "/api/usage?" + query, "GET", node.admin)
    assert reply.status == 200, reply
    return reply.body


def wait_for(node: InProcessNode, query: str, requests: int) -> dict[str, Any]:
    """Usage is folded about once a second: wait until `requests` are in."""
    deadline = time.monotonic() + FOLD_WAIT_S
    while True:
        report = usage(node, query)
        if report["totals"]["requests"] >= requests or time.monotonic() > deadline:
            return report
        time.sleep(0.1)


def test_metered_totals_equal_what_the_engine_reported(node) -> None:
    k1, k2 = (k["key"] for k in node.keys)
    seq_before = node.store.view.rates.get(NODE, {}).get("seq", 0)
    expected = {k: {"requests": 0, "errors": 0, "prompt_tokens": 0, "completion_tokens": 0}
                for k in (node.keys[0]["id"], node.keys[1]["id"])}

    def count(key: dict[str, Any], prompt: int, completion: int, error: bool = False) -> None:
        row = expected[key["id"]]
        row["requests"] += 1
        row["errors"] += error
        row["prompt_tokens"] += prompt
        row["completion_tokens"] += completion

    sync = openai.OpenAI(base_url=node.url + "/v1", api_key=k1, max_retries=0, timeout=30)
    for _ in range(3):
        reply = sync.chat.completions.create(model="tiny", messages=CHAT, max_tokens=16,
                                             extra_body={"grammar": GRAMMAR})
        count(node.keys[0], reply.usage.prompt_tokens, reply.usage.completion_tokens)
    reported = None
    for _ in range(2):
        chunks = list(sync.chat.completions.create(
            model="tiny", messages=CHAT, max_tokens=16, stream=True,
            stream_options={"include_usage": True}, extra_body={"grammar": GRAMMAR}))
        usages = [c.usage for c in chunks if c.usage is not None]
        assert len(usages) == 1 and chunks[-1].usage is not None     # asked for: kept
        reported = usages[0]
        count(node.keys[0], reported.prompt_tokens, reported.completion_tokens)
    with pytest.raises(openai.BadRequestError):                      # the engine says no
        sync.chat.completions.create(model="tiny", messages=CHAT,
                                     extra_body={"grammar": "root ::= ???"})
    count(node.keys[0], 0, 0, error=True)

    async def streams_without_usage() -> list[list[Any]]:
        async with openai.AsyncOpenAI(base_url=node.url + "/v1", api_key=k2, max_retries=0,
                                      timeout=30) as c:
            async def one() -> list[Any]:
                stream = await c.chat.completions.create(
                    model="tiny", messages=CHAT, max_tokens=5, stream=True,
                    extra_body=ONLY_X)
                return [chunk async for chunk in stream]
            return list(await asyncio.gather(one(), one()))

    for chunks in asyncio.run(streams_without_usage()):
        # Not asked for: the gateway asked the engine for usage and kept it from the client.
        assert all(c.usage is None and c.choices for c in chunks)
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == "xxxxx"
        assert reported is not None       # the same messages: the same prompt tokens
        count(node.keys[1], reported.prompt_tokens, 5)
    completion = openai.OpenAI(base_url=node.url + "/v1", api_key=k2, max_retries=0,
                               timeout=30).completions.create(
        model="tiny", prompt="Say hello.", max_tokens=16, extra_body={"grammar": GRAMMAR})
    count(node.keys[1], completion.usage.prompt_tokens, completion.usage.completion_tokens)

    total = sum(row["requests"] for row in expected.values())
    by_key = wait_for(node, "by=key", total)
    assert {row["key"]: {f: row[f] for f in expected[row["key"]]}
            for row in by_key["data"]} == expected
    assert {row["name"] for row in by_key["data"]} == {"k1", "k2"}
    by_user = usage(node, "by=user")["data"]
    assert [(r["user"], r["requests"], r["errors"]) for r in by_user] == [("ann", total, 1)]
    assert by_user[0]["total_tokens"] == sum(r["prompt_tokens"] + r["completion_tokens"]
                                             for r in expected.values())
    assert [(r["model"], r["node"]) for r in usage(node, "by=model,node")["data"]] == \
        [("tiny", NODE)]
    assert usage(node, "by=key&since=1h")["totals"] == by_key["totals"]
    assert usage(node, f"by=key&until={time.time() - 7200}")["totals"]["requests"] == 0
    # Batches, never one write per request: a handful of folds for all of them.
    folds = node.store.view.rates[NODE]["seq"] - seq_before
    assert 1 <= folds < total, folds


def test_gpumesh_usage_prints_the_totals(node, capsys) -> None:
    wait_for(node, "by=user", 1)
    assert cli_main(["usage", "--by", "user", "--since", "24h", "--url", node.url,
                     "--api-key", node.admin]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["USER", "REQUESTS", "ERRORS", "PROMPT",
                                           "COMPLETION", "TOTAL"]
    assert any(line.startswith("ann ") for line in out.splitlines())
    assert cli_main(["usage", "--by", "model", "--json", "--url", node.url,
                     "--api-key", node.admin]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["by"] == "model" and report["data"][0]["model"] == "tiny"
    assert cli_main(["usage", "--since", "yesterday", "--url", node.url,
                     "--api-key", node.admin]) == 2
    assert "since must be a unix time or an age" in capsys.readouterr().err


def test_a_clean_stop_folds_what_is_left_once(tmp_path: Path) -> None:
    """Counted, not yet folded, then the node stops: the last fold takes all of it, and the
    same batch sent again (an unknown outcome retried) counts once."""
    who = Principal(key_id="k9", key_name="k9", user="u9", role="user", models=None,
                    expires=None, key_limits=None, user_limits=None)

    async def main() -> tuple[dict[str, Any], dict[str, Any]]:
        store = new_store(tmp_path)
        await store.start()
        try:
            await store.wait_ready(10)
            meter = Meter(store, "n9", Limiter("n9", lambda: store.view.rates))
            for _ in range(5):
                meter.record(who, "m", "n9", 10, 3, error=False)
            meter.record(who, "m", "n9", 0, 0, error=True)
            batch = meter._next_batch()                  # what a fold would send …
            meter._unsent = batch
            await meter.stop()                           # … and the clean stop sends it
            folded = dict(next(iter(store.view.usage.values())))
            await store.submit(dict(batch))              # the same batch once more
            return folded, dict(next(iter(store.view.usage.values())))
        finally:
            await store.stop()

    folded, after = asyncio.run(main())
    row = folded["n9|k9|m"]
    assert (row["requests"], row["errors"], row["prompt_tokens"],
            row["completion_tokens"]) == (6, 1, 50, 15)
    assert after == folded


def test_fold_usage_adds_up_and_prunes_old_hours() -> None:
    state = empty_state()
    batch = {"op": "fold_usage", "node": "n1", "seq": 1, "at": 7300.0, "keep_after": 0,
             "rows": [[3600, "n1", "k1", "u1", "m", 2, 0, 20, 8],
                      [7200, "n2", "k1", "u1", "m", 1, 1, 5, 0]],
             "rates": {"keys": {"k1": [3, 33, 0]}, "users": {}}}
    state, result = apply_command(state, batch)
    assert result == {"ok": True}
    state, again = apply_command(state, {**batch, "rows": batch["rows"][:1]})
    assert again == {"ok": True, "duplicate": True}       # seq 1 seen: nothing added
    state, _ = apply_command(state, {**batch, "seq": 2, "keep_after": 7200,
                                     "rows": [[7200, "n2", "k1", "u1", "m", 1, 0, 5, 2]]})
    assert list(state["usage"]) == ["7200"]                # the older hour is pruned
    row = state["usage"]["7200"]["n2|k1|m"]
    assert (row["requests"], row["errors"], row["prompt_tokens"],
            row["completion_tokens"]) == (2, 1, 10, 2)
    assert state["rates"]["n1"]["seq"] == 2
