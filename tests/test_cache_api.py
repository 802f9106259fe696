"""The node's model cache and downloads over the API and the CLI, and download progress in
instance records. A real Raft store and the daemon's own HTTP app (in-process), the local
hub from tests/hubserver.py, and `gpumesh models cache ls|rm` as a user runs it.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

from gpumesh.mesh.auth import ADMIN, new_api_key
from gpumesh.mesh.daemon import http_app
from gpumesh.mesh.sources import fetch_source, parse_source
from gpumesh.mesh.sources.reporter import DownloadReporter
from gpumesh.mesh.sources.routes import MODEL_CACHE

from hubserver import HubServer, Repo
from inprocess import InProcessNode, http_request, instance_record
from tinymodels import write_tiny_gguf

NODE = "n-cache"


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubServer]:
    model = write_tiny_gguf(tmp_path_factory.mktemp("files") / "m.gguf").read_bytes()
    server = HubServer(repos={"acme/tiny-GGUF": Repo({"tiny-Q4_K_M.gguf": model}),
                              "acme/slow": Repo({"slow.gguf": model * 4})}).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, hub: HubServer) -> Iterator[InProcessNode]:
    directory = tmp_path_factory.mktemp("cache-node")
    node = InProcessNode(directory / "raft", ("n-front",))
    node.start()
    try:
        node.key, record = new_api_key("admin", ADMIN)
        node.submit({"op": "create_api_key", "key": record, "only_if_no_admin": True})
        node.submit({"op": "upsert_node", "node": {"id": NODE, "name": "cachey",
                                                   "status": "ready"}})
        node.cache_root = directory / "models"

        async def serve_with_cache() -> str:
            app = http_app(node.store, NODE, node.session, time.time(), lambda: [])
            app[MODEL_CACHE] = node.cache_root
            return f"http://127.0.0.1:{(await node._serve(app)).port}"
        node.cache_url = node.call(serve_with_cache())
        yield node
    finally:
        node.stop()


@pytest.fixture(autouse=True)
def hub_env(hub: HubServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    hub.throttle = None


def api(node: InProcessNode, method: str, path: str, url: str | None = None):
    return asyncio.run(http_request((url or node.cache_url) + path, method, key=node.key))


def cli(node: InProcessNode, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "GPUMESH_URL": node.cache_url, "GPUMESH_API_KEY": node.key}
    return subprocess.run([sys.executable, "-m", "gpumesh", "models", "cache", *args],
                          env=env, capture_output=True, text=True, timeout=60, cwd=node.directory)


def test_cache_lists_removes_and_guards_what_is_in_use(node: InProcessNode):
    source = parse_source("acme/tiny-GGUF:Q4_K_M")
    fetch_source(source, node.cache_root)
    listing = api(node, "GET", "/api/cache").body
    assert listing["node_id"] == NODE
    [entry] = listing["data"]
    assert (entry["key"], entry["repo"], entry["revision"], entry["complete"]) == (
        "huggingface/acme--tiny-GGUF/main", "acme/tiny-GGUF", "main", True)
    assert entry["bytes"] > 400_000 and entry["in_use_by"] == []

    node.submit({"op": "create_model", "model": {"name": "remote", "backend": "llama.cpp",
                                                 "replicas": 1, "source": source,
                                                 "estimate": {"total_bytes": 1}}})
    node.submit({"op": "create_instance",
                 "instance": instance_record("remote-1", "remote", "running", NODE)})
    assert api(node, "GET", "/api/cache").body["data"][0]["in_use_by"] == ["remote-1 (remote)"]
    key = entry["key"]
    refused = api(node, "DELETE", f"/api/cache/{key}")
    assert refused.status == 409 and refused.error["code"] == "cache_in_use"
    assert "remote-1 (remote)" in refused.error["message"]

    shown = cli(node, "ls")
    assert shown.returncode == 0, shown.stderr
    assert "model cache of node n-cache" in shown.stdout
    assert key in shown.stdout and "complete" in shown.stdout and "remote-1" in shown.stdout
    as_json = json.loads(cli(node, "ls", "--json").stdout)
    assert as_json["data"][0]["key"] == key

    removed = cli(node, "rm", key, "--force")
    assert removed.returncode == 0, removed.stderr
    assert f"removed {key} from node n-cache" in removed.stdout
    assert api(node, "GET", "/api/cache").body["data"] == []
    missing = cli(node, "rm", key)
    assert missing.returncode == 3 and "no cache entry" in missing.stderr
    node.submit({"op": "delete_model", "name": "remote"})


def test_download_progress_reaches_the_instance_record_and_the_api(node: InProcessNode,
                                                                  hub: HubServer):
    hub.throttle = 1 << 20                               # ~2 s for the 2 MiB file
    source = parse_source("acme/slow")
    node.submit({"op": "create_model", "model": {"name": "slow", "backend": "llama.cpp",
                                                 "replicas": 1, "source": source,
                                                 "estimate": {"total_bytes": 1}}})
    node.submit({"op": "create_instance",
                 "instance": instance_record("slow-1", "slow", "downloading", NODE)})
    worker = threading.Thread(target=fetch_source, args=(source, node.cache_root))
    worker.start()
    reporter = DownloadReporter(node.store, NODE, node.cache_root)
    recorded, live = [], []
    deadline = time.monotonic() + 30
    while worker.is_alive() and time.monotonic() < deadline:
        node.call(reporter.report_once())
        if download := node.store.view.instances["slow-1"].get("download"):
            recorded.append(download)
        live.extend(d for d in api(node, "GET", "/api/downloads").body["data"]
                    if d["state"] == "downloading")
        time.sleep(0.2)
    worker.join(30)
    assert recorded and live
    # Records taken mid-way (not the middle sample: under load the first several can all
    # be taken before the first byte arrived, bytes_done 0); the last of them has a rate.
    midway = [d for d in recorded if 0 < d["bytes_done"] < d["bytes_total"]]
    assert midway, recorded
    middle = midway[-1]
    assert middle["percent"] < 100
    assert middle["rate_bytes_per_s"] > 0 and middle["eta_s"] is not None
    assert live[0]["source"] == "hf://acme/slow"
    # The front node (no cache of its own) says so rather than inventing one.
    assert api(node, "GET", "/api/cache", url=node.url).status == 503
    node.submit({"op": "delete_model", "name": "slow"})
