"""The scheduler through a real `gpumesh up` and the CLI a user types: node labels and
selectors, `deploy --dry-run`, and a model scaled to zero that the first chat request starts
(a real llama.cpp engine) and the idle timeout stops again. Eviction between on-demand
models is in tests/test_on_demand.py (it needs a node smaller than this machine).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Iterator

import openai
import pytest

from harness import Daemon, pid_alive
from tinymodels import write_tiny_gguf

IDLE_S = 4


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    workdir = tmp_path_factory.mktemp("e2e-scheduler")
    write_tiny_gguf(workdir / "tiny.gguf")
    node = Daemon(workdir / "data", "--label", "zone=lab", "--node-name", "lab-1")
    node.start()
    yield node
    node.kill()


def test_labels_steer_placement_and_a_dry_run_says_so(daemon: Daemon) -> None:
    nodes = daemon.api("/api/nodes")[1]["data"]
    assert nodes[0]["labels"] == {"zone": "lab"}
    elsewhere = daemon.cli("deploy", "tiny.gguf", "--name", "t", "--dry-run",
                           "--node-selector", "zone=cloud-*")
    assert elsewhere.returncode == 7, elsewhere.stderr
    assert "the node selector zone=cloud-* leaves out lab-1" in elsewhere.stdout
    here = daemon.cli("deploy", "tiny.gguf", "--name", "t", "--dry-run", "--json",
                      "--node-selector", "zone=l*")
    assert here.returncode == 0, here.stderr
    answer = json.loads(here.stdout)
    assert answer["fits"] and answer["replicas"][0]["node"] == "lab-1"
    assert daemon.api("/api/models")[1]["data"] == []            # nothing was deployed


def test_scaled_to_zero_the_first_request_starts_it_and_idleness_stops_it(daemon: Daemon) -> None:
    deployed = daemon.cli("deploy", "tiny.gguf", "--name", "lazy", "--min-replicas", "0",
                          "--idle-timeout", str(IDLE_S), "--node-selector", "zone=lab",
                          "--wait", "--timeout", "60")
    assert deployed.returncode == 0, deployed.stderr
    assert "lazy is idle: 0/1 replica(s) ready" in deployed.stdout
    client = openai.OpenAI(base_url=daemon.url + "/v1", api_key=daemon.admin_key,
                           max_retries=0, timeout=150)
    reply = client.chat.completions.create(model="lazy", max_tokens=4,
                                           messages=[{"role": "user", "content": "hi"}])
    assert reply.choices[0].message.role == "assistant"
    model = daemon.wait_model("lazy", "running", timeout=10)
    pid = model["instances"][0]["pid"]
    shown = daemon.cli("instances", "--model", "lazy")
    assert shown.returncode == 0 and "binpack: the CPU of lab-1" in shown.stdout
    # No request for IDLE_S: the instance goes, its engine with it; the model stays.
    stopped = daemon.wait_model("lazy", "idle", timeout=IDLE_S + 30)
    assert stopped["instances"] == []
    deadline = time.monotonic() + 15
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not pid_alive(pid)
    again = client.chat.completions.create(model="lazy", max_tokens=4,
                                           messages=[{"role": "user", "content": "hi"}])
    assert again.choices[0].message.role == "assistant"
