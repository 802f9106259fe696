"""Model sources against a local hub (tests/hubserver.py) that speaks Hugging Face's and
ModelScope's file APIs: picking files, the node cache, progress, resume after a cut,
checksums, gated and missing repos, offline mode, a full disk, and remote header reads.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import threading
import time
import uuid
from pathlib import Path
from typing import Iterator

import pytest

from gpumesh import modelfiles
from gpumesh.mesh.sources import (ModelCache, SourceError, describe_source, fetch_source,
                                  parse_source, remote_facts)
from gpumesh.mesh.sources.progress import BOARD

from hubserver import GATED_TOKEN, HubServer, Repo
from tinymodels import write_tiny_gguf, write_tiny_hf_llama


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    made = tmp_path_factory.mktemp("hub-files")
    hf_dir = write_tiny_hf_llama(made / "llama")
    return {
        "q4": write_tiny_gguf(made / "q4.gguf", seed=1).read_bytes(),
        "q8": write_tiny_gguf(made / "q8.gguf", seed=2, n_embd=128).read_bytes(),
        **{f"hf/{p.name}": p.read_bytes() for p in hf_dir.iterdir() if p.is_file()},
    }


@pytest.fixture(scope="module")
def hub(files: dict[str, bytes]) -> Iterator[HubServer]:
    gguf = {"tiny-Q4_K_M.gguf": files["q4"], "tiny-Q8_0.gguf": files["q8"],
            "README.md": b"# tiny\n"}
    hf = {name[3:]: data for name, data in files.items() if name.startswith("hf/")}
    server = HubServer(repos={
        "acme/tiny-GGUF": Repo(gguf),
        "acme/tiny-GGUF-ms": Repo(gguf, revision="master"),
        "acme/tiny-llama": Repo(hf),
        "acme/locked": Repo(gguf, gated=True),
        "acme/big": Repo({"big.gguf": files["q8"] * 4}),
    }).start()
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def endpoints(hub: HubServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("MODELSCOPE_DOMAIN", hub.url)
    for name in ("HF_TOKEN", "HF_HUB_OFFLINE", "GPUMESH_OFFLINE", "MODELSCOPE_API_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    hub.log.clear()
    hub.throttle = None
    hub.on_file = None


def gets(hub: HubServer) -> list[tuple[str, str | None]]:
    return [(p, r) for m, p, r in hub.log if m == "GET"]


# --- what a user types ----------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("acme/tiny-GGUF:Q4_K_M", {"kind": "huggingface", "repo": "acme/tiny-GGUF", "file": None,
                               "revision": "main", "pattern": "*Q4_K_M*.gguf"}),
    ("hf://acme/x:*q8*.gguf", {"kind": "huggingface", "repo": "acme/x", "file": None,
                               "revision": "main", "pattern": "*q8*.gguf"}),
    ("ms://acme/x", {"kind": "modelscope", "repo": "acme/x", "file": None,
                     "revision": "master"}),
    ("modelscope://acme/x@v1.1:m.gguf", {"kind": "modelscope", "repo": "acme/x",
                                         "file": "m.gguf", "revision": "v1.1"}),
    ("acme/x@dev", {"kind": "huggingface", "repo": "acme/x", "file": None, "revision": "dev"}),
])
def test_source_forms(text: str, expected: dict, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert parse_source(text) == expected
    assert parse_source(describe_source(expected)) == expected


# --- picking files, the cache, offline ----------------------------------------------------------

def test_one_quant_of_a_gguf_repo_is_downloaded_once_and_cached(hub, files, tmp_path):
    source = parse_source("acme/tiny-GGUF:Q4_K_M")
    path = fetch_source(source, tmp_path)
    assert path.name == "tiny-Q4_K_M.gguf" and path.read_bytes() == files["q4"]
    assert [p for p, _ in gets(hub)] == ["tiny-Q4_K_M.gguf"]          # not the other quant
    assert not list(path.parent.glob("*.part"))
    hub.log.clear()
    assert fetch_source(source, tmp_path) == path                      # the cache answers
    assert hub.log == []
    entry = ModelCache(tmp_path).entries()[0]
    assert (entry["key"], entry["complete"], entry["bytes"]) == (
        "huggingface/acme--tiny-GGUF/main", True, len(files["q4"]))


def test_modelscope_repos_come_through_its_own_api(hub, files, tmp_path):
    path = fetch_source(parse_source("ms://acme/tiny-GGUF-ms:tiny-Q8_0.gguf"), tmp_path)
    assert path.read_bytes() == files["q8"]
    assert path.parent == tmp_path / "modelscope" / "acme--tiny-GGUF-ms" / "master"


def test_a_safetensors_repo_brings_weights_config_and_tokenizer(hub, files, tmp_path):
    path = fetch_source(parse_source("acme/tiny-llama"), tmp_path)
    assert modelfiles.detect_format(path) == "safetensors"
    names = sorted(p.name for p in path.iterdir() if not p.name.startswith("."))
    assert "config.json" in names and "model.safetensors" in names and "tokenizer.json" in names


def test_choices_that_are_not_one_model_are_refused_in_words(hub, tmp_path):
    with pytest.raises(SourceError, match=r"has 2 GGUF models; pick one as acme/tiny-GGUF:FILE"):
        fetch_source(parse_source("acme/tiny-GGUF"), tmp_path)
    with pytest.raises(SourceError, match=r"nothing in acme/tiny-GGUF matches '\*IQ2_XS\*\.gguf'"):
        fetch_source(parse_source("acme/tiny-GGUF:IQ2_XS"), tmp_path)
    with pytest.raises(SourceError, match=r"matches 2 GGUF models"):
        fetch_source(parse_source("acme/tiny-GGUF:*.gguf"), tmp_path)


def test_missing_repos_files_and_revisions(hub, tmp_path):
    with pytest.raises(SourceError, match="acme/nope was not found on Hugging Face .or it is "
                                          "private: set HF_TOKEN."):
        fetch_source(parse_source("acme/nope"), tmp_path)
    with pytest.raises(SourceError, match="acme/tiny-GGUF has no file 'gone.gguf'"):
        fetch_source(parse_source("acme/tiny-GGUF:gone.gguf"), tmp_path)
    with pytest.raises(SourceError, match="acme/tiny-GGUF has no revision 'v9'"):
        fetch_source(parse_source("acme/tiny-GGUF@v9:Q4_K_M"), tmp_path)
    with pytest.raises(SourceError, match="acme/nope was not found on ModelScope"):
        fetch_source(parse_source("ms://acme/nope"), tmp_path)


def test_a_gated_repo_says_where_to_accept_and_works_with_a_token(hub, files, tmp_path,
                                                                  monkeypatch):
    with pytest.raises(SourceError) as refused:
        fetch_source(parse_source("acme/locked:Q4_K_M"), tmp_path)
    assert str(refused.value) == (f"acme/locked is gated on Hugging Face: accept its terms at "
                                  f"{hub.url}/acme/locked, then give this node a token with "
                                  "access (HF_TOKEN)")
    monkeypatch.setenv("HF_TOKEN", GATED_TOKEN)
    assert fetch_source(parse_source("acme/locked:Q4_K_M"), tmp_path).read_bytes() == files["q4"]


def test_offline_serves_the_cache_and_refuses_the_rest(hub, files, tmp_path, monkeypatch):
    fetch_source(parse_source("acme/tiny-GGUF:Q4_K_M"), tmp_path)
    hub.log.clear()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert fetch_source(parse_source("acme/tiny-GGUF:Q4_K_M"), tmp_path).read_bytes() == files["q4"]
    with pytest.raises(SourceError, match="offline .* its cache lacks hf://acme/tiny-GGUF:"):
        fetch_source(parse_source("acme/tiny-GGUF:Q8_0"), tmp_path)
    with pytest.raises(SourceError, match="this node is offline"):
        remote_facts(parse_source("acme/tiny-GGUF:Q8_0"))
    assert hub.log == []                                 # not one request left the node


# --- progress, resume, checksum ---------------------------------------------------------------

def test_progress_has_bytes_rate_and_eta_while_it_downloads(hub, files, tmp_path):
    hub.throttle = 2 << 20                       # 2 MiB/s: the 4-file repo takes ~1 s
    source = parse_source("acme/big")
    key = str(ModelCache(tmp_path).folder(source))
    worker = threading.Thread(target=fetch_source, args=(source, tmp_path))
    worker.start()
    seen = []
    deadline = time.monotonic() + 30
    while worker.is_alive() and time.monotonic() < deadline:
        if (p := BOARD.get(key)) and p["state"] == "downloading" and p["bytes_done"]:
            seen.append(p)
        time.sleep(0.05)
    worker.join(30)
    assert len(seen) >= 3, seen
    middle = seen[len(seen) // 2]
    assert 0 < middle["bytes_done"] < middle["bytes_total"] == len(files["q8"]) * 4
    assert middle["rate_bytes_per_s"] > 0 and middle["eta_s"] is not None
    assert 0 < middle["percent"] < 100
    assert [p["bytes_done"] for p in seen] == sorted(p["bytes_done"] for p in seen)
    done = BOARD.get(key)
    assert (done["state"], done["bytes_done"], done["percent"]) == ("done", len(files["q8"]) * 4, 100.0)


def test_a_cut_connection_resumes_where_it_stopped(hub, files, tmp_path):
    hub.cut["tiny-Q8_0.gguf"] = 300_000
    path = fetch_source(parse_source("acme/tiny-GGUF:Q8_0"), tmp_path)
    assert path.read_bytes() == files["q8"]                        # and its SHA-256 checked
    assert hub.file_requests("tiny-Q8_0.gguf") == [None, "bytes=300000-"]


def test_a_part_left_by_an_earlier_run_is_resumed_not_restarted(hub, files, tmp_path):
    source = parse_source("acme/tiny-GGUF:Q8_0")
    folder = ModelCache(tmp_path).folder(source)
    folder.mkdir(parents=True)
    (folder / "tiny-Q8_0.gguf.part").write_bytes(files["q8"][:123_456])
    assert fetch_source(source, tmp_path).read_bytes() == files["q8"]
    assert hub.file_requests("tiny-Q8_0.gguf") == ["bytes=123456-"]


def test_a_file_that_fails_its_checksum_is_deleted(hub, tmp_path):
    hub.corrupt.add("tiny-Q4_K_M.gguf")
    try:
        with pytest.raises(SourceError, match=r"tiny-Q4_K_M.gguf failed its checksum .SHA-256"):
            fetch_source(parse_source("acme/tiny-GGUF:Q4_K_M"), tmp_path)
    finally:
        hub.corrupt.clear()
    folder = tmp_path / "huggingface" / "acme--tiny-GGUF" / "main"
    assert not list(folder.glob("tiny-Q4_K_M.gguf*"))


def test_the_test_hub_speaks_hugging_faces_protocol(hub, files, tmp_path):
    """huggingface_hub itself downloads from the test hub: the protocol our client speaks
    (and the hub mimics) is Hugging Face's, not one we made up."""
    import huggingface_hub

    path = huggingface_hub.hf_hub_download("acme/tiny-GGUF", "tiny-Q4_K_M.gguf",
                                           cache_dir=str(tmp_path), endpoint=hub.url)
    assert Path(path).read_bytes() == files["q4"]
    info = huggingface_hub.HfApi(endpoint=hub.url).model_info("acme/tiny-GGUF",
                                                              files_metadata=True)
    sizes = {s.rfilename: s.size for s in info.siblings}
    assert sizes["tiny-Q8_0.gguf"] == len(files["q8"])


# --- the disk ----------------------------------------------------------------------------------

@pytest.fixture()
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs (root only: mounting needs it)."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root to mount a small tmpfs")
    mount_point = tmp_path / f"disk-{uuid.uuid4().hex[:8]}"
    mount_point.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount_point)],
                   check=True)
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


@pytest.mark.root
def test_free_disk_is_checked_before_anything_is_downloaded(hub, small_disk):
    with pytest.raises(SourceError, match=r"not enough disk for the download: it needs 4\.\d MiB "
                                          r"more .* which has 2\.0 MiB free"):
        fetch_source(parse_source("acme/big"), small_disk)            # 4.6 MiB > 2 MiB
    assert gets(hub) == []


@pytest.mark.root
def test_a_disk_that_fills_mid_way_stops_with_what_was_done_and_resumes(hub, files, small_disk):
    filler = small_disk / "someone-else.bin"
    hub.on_file = lambda path: filler.write_bytes(b"\0" * (1536 << 10))   # another program
    with pytest.raises(SourceError, match=r"the disk holding .* is full: [\d.]+ KiB of "
                                          r"1\.1 MiB of tiny-Q8_0.gguf downloaded"):
        fetch_source(parse_source("acme/tiny-GGUF:Q8_0"), small_disk)
    part = small_disk / "huggingface" / "acme--tiny-GGUF" / "main" / "tiny-Q8_0.gguf.part"
    kept = part.stat().st_size
    assert 0 < kept < len(files["q8"])
    hub.on_file = None
    filler.unlink()
    path = fetch_source(parse_source("acme/tiny-GGUF:Q8_0"), small_disk)
    assert path.read_bytes() == files["q8"]
    assert hub.file_requests("tiny-Q8_0.gguf")[-1] == f"bytes={kept}-"


# --- remote headers for the estimate -------------------------------------------------------------

def test_remote_facts_read_only_headers_and_match_the_local_files(hub, files, tmp_path):
    local = tmp_path / "q8.gguf"
    local.write_bytes(files["q8"])
    facts = remote_facts(parse_source("acme/tiny-GGUF:Q8_0"))
    assert facts == modelfiles.model_facts(local)
    assert all(r is not None and r.startswith("bytes=0-") for _, r in gets(hub))

    hub.log.clear()
    llama = tmp_path / "llama"
    llama.mkdir()
    for name, data in files.items():
        if name.startswith("hf/"):
            (llama / name[3:]).write_bytes(data)
    remote = remote_facts(parse_source("acme/tiny-llama"))
    assert remote == modelfiles.model_facts(llama)
    assert remote.parameters and remote.dtype == "float32"
    weight_reads = [r for p, r in gets(hub) if p == "model.safetensors"]
    assert weight_reads and all(r is not None for r in weight_reads)      # ranges only
    size = len(files["hf/model.safetensors"])
    assert sum(int(r.split("-")[1]) - int(r.split("=")[1].split("-")[0]) + 1
               for r in weight_reads) < size // 10


def test_sha256_of_the_listing_is_what_the_hub_serves(hub, files):
    listed = {f.path: f for f in __import__("gpumesh.mesh.sources.hubs", fromlist=["x"])
              .hub_for("huggingface").list_files("acme/tiny-GGUF", "main")}
    assert listed["tiny-Q4_K_M.gguf"].sha256 == hashlib.sha256(files["q4"]).hexdigest()
    assert listed["README.md"].sha256 is None                  # small files are not LFS
