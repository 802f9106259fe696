"""What a node operator sets for placement and on-demand models, through a real daemon:
`--wake-timeout` bounds how long the first request to a sleeping model waits, and a hub
model already in the node's cache deploys while the hub cannot be reached (the facts are
read from the cached files, and the deploy says so). GPU labels (`--gpu-label`) are tested
with the GPU probes (tests/test_accelerator_probes.py), where a node has GPUs.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from harness import Daemon
from hubserver import HubServer, Repo
from tinymodels import write_tiny_gguf

WAKE_S = 2.0
REPO = "acme/tiny-GGUF"


def test_the_first_request_waits_only_the_wake_timeout(tmp_path: Path) -> None:
    daemon = Daemon(tmp_path / "node", "--wake-timeout", str(WAKE_S))
    daemon.start()
    try:
        # An engine that never answers its health check: the instance stays "starting".
        model = write_tiny_gguf(tmp_path / "tiny.gguf")
        deployed = daemon.cli("deploy", str(model), "--name", "sleepy", "--backend", "custom",
                              "--arg", "sleep", "--arg", "600", "--min-replicas", "0")
        assert deployed.returncode == 0, deployed.stderr
        started = time.monotonic()
        status, answer = daemon.request("POST", "/v1/chat/completions", {
            "model": "sleepy", "messages": [{"role": "user", "content": "hi"}]}, timeout=150)
        waited = time.monotonic() - started
        assert status == 503, answer
        assert answer["error"]["code"] == "model_not_ready"
        assert "starting" in answer["error"]["message"]        # woken, not ready in time
        assert WAKE_S <= waited < 60, waited                  # not the default 120 s
        assert f"waiting up to {WAKE_S:.0f} s for an instance" in daemon.output()
    finally:
        daemon.kill()


@pytest.fixture()
def hub(tmp_path: Path):
    model = write_tiny_gguf(tmp_path / "tiny-Q4_K_M.gguf")
    server = HubServer(repos={REPO: Repo({"tiny-Q4_K_M.gguf": model.read_bytes()})}).start()
    yield server
    server.stop()


def test_a_cached_hub_model_deploys_with_the_hub_away(tmp_path: Path, hub: HubServer,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", hub.url)          # the daemon inherits it
    daemon = Daemon(tmp_path / "node")
    daemon.start()
    try:
        first = daemon.cli("deploy", f"{REPO}:Q4_K_M", "--name", "first", "--wait",
                           "--timeout", "90")
        assert first.returncode == 0, first.stderr + daemon.output()[-2000:]
        assert "note:" not in first.stderr                 # the hub answered
        hub.stop()                                          # now it cannot be asked
        second = daemon.cli("deploy", f"{REPO}:Q4_K_M", "--name", "second", "--wait",
                            "--timeout", "90")
        assert second.returncode == 0, second.stderr + daemon.output()[-2000:]
        assert "note: read from this node's cache (" in second.stderr
        assert "the hub could not be asked" in second.stderr
        code, model = daemon.api("/api/models/second")
        assert model["status"] == "running" and model["estimate"]["basis"] == "cache"
        assert model["notes"][0].startswith("read from this node's cache")
        code, first_model = daemon.api("/api/models/first")
        assert model["estimate"]["by_device"] == first_model["estimate"]["by_device"]
        # a dry run says the same; a repo the cache lacks is refused in the hub's words
        status, answer = daemon.request("POST", "/api/models/evaluate",
                                        {"source": f"{REPO}:Q4_K_M", "name": "third"})
        assert status == 200 and any(c["check"] == "source" and "cache" in c["detail"]
                                     for c in answer["checks"]), answer
        missing = daemon.cli("deploy", "acme/other-GGUF", "--name", "other")
        assert missing.returncode == 2 and "note:" not in missing.stderr, missing.stderr
    finally:
        daemon.kill()
