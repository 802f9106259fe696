"""`POST /api/models/evaluate` and `gpumesh deploy --dry-run` through the real API.

One in-process node (the daemon's own HTTP app on a real Raft store) whose state holds a
few GPU nodes written by the test; models are real GGUF files, made large where a test needs
it as sparse files (a valid header, an apparent size of many GiB, no disk used). Node sizes
are set from the estimate the API itself reports, so the tests hold whatever the estimate's
constants are.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from gpumesh.mesh.auth import ADMIN, new_api_key

from inprocess import InProcessNode, http_request
from tinymodels import write_tiny_gguf

GiB = 1 << 30
LLAMA = {"llama.cpp": {"version": "test", "runs_on_cpu": True, "gpu_vendors": ["nvidia"]}}


def gpu(index: int, total: int) -> dict:
    return {"index": index, "vendor": "nvidia", "name": "NVIDIA test", "uuid": f"GPU-{index}",
            "memory_total_bytes": total, "memory_used_bytes": 0}


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessNode]:
    node = InProcessNode(tmp_path_factory.mktemp("evaluate"), ("n-front",))
    node.start()
    node.key, record = new_api_key("admin", ADMIN)
    node.submit({"op": "create_api_key", "key": record, "only_if_no_admin": True})
    yield node
    node.stop()


@pytest.fixture(scope="module")
def big_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A GGUF whose file is 18 GiB (sparse): the weights the estimate reads."""
    path = write_tiny_gguf(tmp_path_factory.mktemp("big") / "big.gguf")
    os.truncate(path, 18 * GiB)
    return path


def evaluate(node: InProcessNode, body: dict[str, Any]):
    return asyncio.run(http_request(node.url + "/api/models/evaluate", "POST", key=node.key,
                                    json_body=body))


def put_nodes(node: InProcessNode, *records: dict) -> None:
    for name in list(node.store.view.nodes):
        node.submit({"op": "remove_node", "id": name})
    for record in records:
        node.submit({"op": "upsert_node", "node": record})


def gpu_node(node_id: str, gpus: list[dict], ram: int = 4 * GiB) -> dict:
    return {"id": node_id, "name": node_id, "status": "ready", "backends": LLAMA,
            "inventory": {"cpu_cores": 8, "memory_total_bytes": ram,
                          "memory_available_bytes": ram, "gpus": gpus}}


def test_two_gpus_of_one_node_when_no_single_gpu_fits(node: InProcessNode, big_model: Path):
    first = evaluate(node, {"source": str(big_model), "name": "big"})
    assert first.status == 200, first
    need = first.body["estimate"]["total_bytes"]
    assert need > 18 * GiB
    # node-b's one GPU is 85% of the need (after the 10% the scheduler keeps free); node-a
    # has two GPUs of 70% each: together they fit in tensor parallel 2.
    put_nodes(node, gpu_node("node-a", [gpu(0, int(need * 0.7 / 0.9)), gpu(1, int(need * 0.7 / 0.9))]),
              gpu_node("node-b", [gpu(0, int(need * 0.85 / 0.9))]))
    answer = evaluate(node, {"source": str(big_model), "name": "big"}).body
    assert answer["fits"] is True
    replica = answer["replicas"][0]
    assert replica["node"] == "node-a" and replica["allocation"]["gpu_indices"] == [0, 1]
    assert replica["allocation"]["tensor_parallel"] == 2
    summary = answer["summary"]
    assert summary.startswith(f"needs {need / GiB:.1f} GiB; the largest free GPU has ")
    assert "on node-b (GPU 0); two GPUs on node-a (GPUs 0, 1) fit with tensor parallel 2" in summary
    assert node.store.view.models == {}                 # a dry run stores nothing


def test_a_model_that_fits_nowhere_says_why_with_200(node: InProcessNode, big_model: Path):
    put_nodes(node, gpu_node("node-a", [gpu(0, 8 * GiB)]), gpu_node("node-b", [gpu(0, 8 * GiB)]))
    answer = evaluate(node, {"source": str(big_model), "name": "big",
                             "placement": {"multi_node": False}})
    assert answer.status == 200 and answer.body["fits"] is False
    summary = answer.body["summary"]
    assert "the largest free GPU has 7.2 GiB on node-a (GPU 0)" in summary
    assert "two GPUs on one node" not in summary or "the best has" in summary
    assert "of RAM: the most free is" in summary


def test_replicas_spread_over_nodes_and_on_demand_is_said(node: InProcessNode, tmp_path: Path):
    small = write_tiny_gguf(tmp_path / "small.gguf")
    put_nodes(node, *(gpu_node(n, [gpu(0, 16 * GiB)]) for n in ("node-a", "node-b", "node-c")))
    answer = evaluate(node, {"source": str(small), "name": "small", "replicas": 3,
                             "min_replicas": 0}).body
    assert answer["fits"] is True
    assert sorted(r["node"] for r in answer["replicas"]) == ["node-a", "node-b", "node-c"]
    assert answer["summary"].startswith("all 3 replicas fit: on node-a, node-b, node-c")
    assert "on demand: 0 run while idle" in answer["summary"]


def test_checks_name_taken_and_engine_missing(node: InProcessNode, tmp_path: Path):
    small = write_tiny_gguf(tmp_path / "small.gguf")
    put_nodes(node, {**gpu_node("node-v", [gpu(0, 16 * GiB)]),
                     "backends": {"vllm": {"runs_on_cpu": False, "gpu_vendors": ["nvidia"]}}})
    answer = evaluate(node, {"source": str(small), "name": "small"}).body
    engine = next(c for c in answer["checks"] if c["check"] == "engine")
    assert engine["ok"] is False and "they have: vllm" in engine["detail"]
    assert answer["fits"] is False
    node.submit({"op": "create_model", "model": {"name": "taken", "backend": "llama.cpp",
                                                 "replicas": 1, "estimate": {"total_bytes": 1}}})
    taken = evaluate(node, {"source": str(small), "name": "taken"}).body
    assert taken["checks"][0] == {"check": "name", "ok": False,
                                  "detail": "a model named 'taken' already exists"}
    node.submit({"op": "delete_model", "name": "taken"})


def test_bad_input_gets_the_deploys_400(node: InProcessNode, tmp_path: Path):
    small = write_tiny_gguf(tmp_path / "small.gguf")
    bad = evaluate(node, {"source": str(small), "placement": {"policy": "random"}})
    assert bad.status == 400 and bad.error["param"] == "placement.policy"
    missing = evaluate(node, {"source": str(tmp_path / "nope.gguf")})
    assert missing.status == 400 and missing.error["param"] == "source"


def test_deploy_dry_run_prints_the_plan_and_exits_7_when_it_does_not_fit(
        node: InProcessNode, big_model: Path, tmp_path: Path):
    put_nodes(node, gpu_node("node-a", [gpu(0, 8 * GiB)]))
    env = {**os.environ, "GPUMESH_URL": node.url, "GPUMESH_API_KEY": node.key}

    def dry_run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "gpumesh", "deploy", *args, "--dry-run"],
                              env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)

    small = write_tiny_gguf(tmp_path / "small.gguf")
    fits = dry_run(str(small), "--name", "small", "--policy", "spread", "--gpus-per-replica", "1")
    assert fits.returncode == 0, fits.stderr
    assert "small (llama.cpp, gguf): fits" in fits.stdout
    assert "replica 1: GPU 0 (NVIDIA test) on node-a" in fits.stdout
    too_big = dry_run(str(big_model), "--name", "big", "--single-node")
    assert too_big.returncode == 7, too_big.stderr
    assert "does not fit" in too_big.stdout and "the largest free GPU has 7.2 GiB" in too_big.stdout
    assert node.store.view.models == {}
    bad = dry_run(str(small), "--node-selector", "zone")
    assert bad.returncode == 2 and "--node-selector takes LABEL=GLOB" in bad.stderr
    started = time.monotonic()
    assert dry_run(str(small), "--name", "x", "--json").returncode == 0
    assert time.monotonic() - started < 60


def test_a_hub_model_is_evaluated_from_its_headers_alone(node: InProcessNode, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch):
    from gpumesh.modelfiles import estimate_memory
    from hubserver import HubServer, Repo

    local = write_tiny_gguf(tmp_path / "tiny-Q4_K_M.gguf", context_length=2048)
    hub = HubServer(repos={"acme/tiny-GGUF": Repo({"tiny-Q4_K_M.gguf": local.read_bytes()})}).start()
    try:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        put_nodes(node, gpu_node("node-a", [gpu(0, 16 * GiB)]))
        answer = evaluate(node, {"source": "acme/tiny-GGUF:Q4_K_M", "name": "remote"})
        assert answer.status == 200, answer
        estimate = answer.body["estimate"]
        assert estimate["basis"] == "headers"
        assert estimate["by_device"] == estimate_memory(local).by_device
        assert answer.body["fits"] is True
        ranges = [r for m, p, r in hub.log if m == "GET"]
        assert ranges and all(r and r.startswith("bytes=0-") for r in ranges)   # no download
    finally:
        hub.stop()
