"""The probes of the other accelerator families (Ascend, Hygon, Moore Threads, Iluvatar, MetaX,
Cambricon), `--gpus`, and the vendor -> visibility-variable map.

No such hardware exists here. Each parser reads real outputs of its vendor's tool, taken from
the vendor's documentation or the field's open-source tools (tests/fixtures/accelerators/: the
`#source:` lines atop each file say where from, and say so where a file is reconstructed).
The probes themselves run the same outputs through a stand-in executable of the tool's name
on PATH, so the code that finds, runs, times out and parses the tool is the real one.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from harness import Daemon
from tinymodels import write_tiny_gguf

from gpumesh.accelerators import VENDORS, VISIBLE_DEVICES_ENV, visible_devices_env
from gpumesh.mesh.config import Config, ConfigError
from gpumesh.mesh.probes import (GPU_PROBES, AscendProbe, CambriconProbe, CpuProbe, HygonProbe,
                                 IluvatarProbe, MetaxProbe, MThreadsProbe, ProbeUnavailable,
                                 open_probe)
from gpumesh.mesh.probes import tools
from gpumesh.mesh.probes.ascend import parse_npu_smi_info, parse_npu_smi_mapping
from gpumesh.mesh.probes.cambricon import parse_cnmon
from gpumesh.mesh.probes.hygon import parse_hy_smi_json
from gpumesh.mesh.probes.iluvatar import parse_smi_csv
from gpumesh.mesh.probes.metax import parse_mx_smi
from gpumesh.mesh.probes.mthreads import parse_mthreads_gmi_q

FIXTURES = Path(__file__).parent / "fixtures" / "accelerators"
MiB = 1 << 20
TOOL_PROBES = (AscendProbe, HygonProbe, MThreadsProbe, IluvatarProbe, MetaxProbe, CambriconProbe)


def fixture(name: str) -> str:
    """The tool's output as printed, without our `#source:` provenance lines."""
    lines = (FIXTURES / name).read_text().splitlines(keepends=True)
    return "".join(line for line in lines if not line.startswith("#source:"))


def summary(devices) -> list[tuple]:
    return [(d.index, d.vendor, d.name, d.memory_used_bytes // MiB, d.memory_total_bytes // MiB,
             d.utilization_percent, d.temperature_c, d.power_w) for d in devices]


# --- parsers on real outputs ------------------------------------------------------------------

def test_every_fixture_says_where_it_came_from() -> None:
    files = sorted(FIXTURES.iterdir())
    assert len(files) >= 12
    for path in files:
        assert path.read_text().startswith("#source:"), path.name


def test_npu_smi_910a_training_server() -> None:
    mapping = parse_npu_smi_mapping(fixture("npu-smi-info-m-atlas800-9010-24.1.RC2.txt"))
    assert mapping[(3, 0)] == (3, "Ascend 910A") and len(mapping) == 8
    devices = parse_npu_smi_info(fixture("npu-smi-info-atlas800-9010-24.1.RC2.txt"), mapping)
    assert [d.index for d in devices] == list(range(8))
    # 910A: the HBM columns are the device memory (32 GiB), not the DDR "Memory-Usage".
    assert summary(devices)[3] == (3, "ascend", "Ascend 910A", 0, 32768, 0.0, 39.0, 206.9)
    assert devices[0].uuid == "ascend-0000:c1:00.0"
    assert len({d.uuid for d in devices}) == 8      # the process table is not read as devices


def test_npu_smi_910b_with_busy_hbm_and_no_mapping() -> None:
    devices = parse_npu_smi_info(fixture("npu-smi-info-910b1-23.0.rc3.txt"), {})
    assert summary(devices) == [(0, "ascend", "Ascend 910B1", 65099, 65536, 55.0, 41.0, 271.1),
                                (1, "ascend", "Ascend 910B1", 65098, 65536, 66.0, 42.0, 275.0)]


def test_npu_smi_310_card_with_four_chips_maps_logic_ids_and_skips_the_mcu() -> None:
    mapping = parse_npu_smi_mapping(fixture("npu-smi-info-m-atlas800-3000-21.0.4.txt"))
    assert (6, 4) not in mapping                      # the card's MCU has no logic id
    devices = parse_npu_smi_info(fixture("npu-smi-info-atlas800-3000-21.0.4.txt"), mapping)
    assert summary(devices) == [
        (0, "ascend", "MiniD", 2703, 8192, 0.0, 73.0, 12.8),   # no HBM: DDR is the memory
        (1, "ascend", "MiniD", 2867, 8192, 0.0, 74.0, 12.8),
        (2, "ascend", "MiniD", 2867, 8192, 0.0, 70.0, 12.8),
        (3, "ascend", "MiniD", 2867, 8192, 0.0, 65.0, 12.8)]


def test_hy_smi_json_dcu_and_hcu() -> None:
    (dcu,) = parse_hy_smi_json(fixture("hy-smi-json-dtk-24.04.3.json"))
    assert summary([dcu]) == [(0, "hygon", "DCU xxxx", 2, 65520, 0.0, 39.0, 80.0)]
    assert dcu.uuid == "7100fa8866904061"
    (k100,) = parse_hy_smi_json(fixture("hy-smi-json-k100ai.json"))
    assert summary([k100]) == [(0, "hygon", "K100_AI", 2, 65520, 0.0, 35.0, 77.0)]


def test_ixsmi_csv_with_units() -> None:
    fields = ("index", "name", "memory.total", "memory.used", "utilization.gpu", "temperature.gpu")
    devices = parse_smi_csv(fixture("ixsmi-query-csv.txt"), fields, vendor="iluvatar")
    assert summary(devices) == [(0, "iluvatar", "Iluvatar MR-V50", 116, 16384, 0.0, 30.0, None),
                                (1, "iluvatar", "Iluvatar MR-V100", 27996, 32768, 0.0, 36.0, None)]
    assert [d.uuid for d in devices] == ["iluvatar-0", "iluvatar-1"]   # not asked for: stand-ins


def test_mthreads_gmi_q_sections() -> None:
    devices = parse_mthreads_gmi_q(fixture("mthreads-gmi-q-s4000.txt"))
    assert summary(devices) == [(0, "mthreads", "MTT S4000", 1203, 49152, 3.0, 45.0, 88.5),
                                (1, "mthreads", "MTT S4000", 40960, 49152, 97.0, 71.0, None)]
    assert devices[1].uuid == "0b9e2d41-77a6-4c0f-8e35-91d2c3b4a5f6"


def test_mx_smi_table_stops_before_the_process_list() -> None:
    devices = parse_mx_smi(fixture("mx-smi-2x-n260.txt"))
    assert summary(devices) == [(0, "metax", "MetaX N260", 666, 65536, 0.0, 37.0, 29.0),
                                (1, "metax", "MetaX N260", 666, 65536, 0.0, 37.0, 33.0)]
    assert devices[1].uuid == "metax-0000:21:00.0"


def test_cnmon_both_layouts() -> None:
    devices = parse_cnmon(fixture("cnmon-2x-mlu370-x8-5.10.13.txt"))
    assert summary(devices) == [(0, "cambricon", "MLU370-X8", 0, 23374, 0.0, 32.0, 106.0),
                                (1, "cambricon", "MLU370-X8", 0, 23374, 0.0, 39.0, 106.0)]
    assert devices[0].uuid == "cambricon-0000:39:00.0"
    old = parse_cnmon(fixture("cnmon-2x-mlu370-x4-4.20.11.txt"))     # "Inited Driver", vMemory
    assert summary(old) == [(0, "cambricon", "MLU370-X4", 0, 23308, 0.0, 32.0, 30.0),
                            (1, "cambricon", "MLU370-X4", 0, 23308, 0.0, 33.0, 25.0)]
    assert old[1].uuid == "cambricon-card1"


def test_garbage_gives_no_devices_not_made_up_ones() -> None:
    for text in ("", "command not found\n", "+---+\n| a | b |\n+---+\n"):
        assert parse_npu_smi_info(text, {}) == []
        assert parse_mx_smi(text) == [] and parse_cnmon(text) == []
        assert parse_mthreads_gmi_q(text) == []
        assert parse_smi_csv(text, ("index", "name", "memory.total", "memory.used"),
                             vendor="iluvatar") == []


# --- the probes, running a stand-in of each tool --------------------------------------------

FAKE_OUTPUTS = {
    AscendProbe: {"info -m": "npu-smi-info-m-atlas800-9010-24.1.RC2.txt",
                  "info": "npu-smi-info-atlas800-9010-24.1.RC2.txt"},
    HygonProbe: {"*": "hy-smi-json-dtk-24.04.3.json"},
    MThreadsProbe: {"-q": "mthreads-gmi-q-s4000.txt"},
    MetaxProbe: {"": "mx-smi-2x-n260.txt"},
    CambriconProbe: {"": "cnmon-2x-mlu370-x8-5.10.13.txt"},
}


def fake_tool(directory: Path, name: str, outputs: dict[str, str], *, exit_code: int = 0,
              sleep_s: float = 0.0) -> Path:
    """An executable called `name` that prints a fixture chosen by its arguments."""
    directory.mkdir(parents=True, exist_ok=True)
    cases = []
    for args, fixture_name in outputs.items():
        body = directory / f"{name}.{len(cases)}.out"
        body.write_text(fixture(fixture_name))
        cases.append(f"  {'*' if args == '*' else repr(args)}) cat {body};;")
    script = directory / name
    script.write_text("\n".join([
        "#!/bin/sh", f"sleep {sleep_s}", 'case "$*" in', *cases,
        '  *) echo "unexpected arguments: $*" >&2; exit 64;;', "esac", f"exit {exit_code}", ""]))
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


@pytest.mark.parametrize("probe_class", list(FAKE_OUTPUTS), ids=lambda c: c.name)
def test_probe_runs_its_tool_and_merges_the_cpu_figures(tmp_path: Path, probe_class) -> None:
    tool = fake_tool(tmp_path, probe_class.tool, FAKE_OUTPUTS[probe_class])
    with probe_class(tool_path=str(tool)) as probe:
        inventory = probe.inventory()
    assert inventory.probe == probe_class.name
    assert inventory.gpus and {g.vendor for g in inventory.gpus} == {probe_class.name}
    with CpuProbe() as cpu:
        assert inventory.cpu_cores == cpu.cpu_cores()


def test_gpus_flag_offers_only_the_chosen_devices(tmp_path: Path) -> None:
    tool = fake_tool(tmp_path, "npu-smi", FAKE_OUTPUTS[AscendProbe])
    with AscendProbe(tool_path=str(tool), gpus=(1, 6)) as probe:
        assert probe.device_count == 2
        assert [g.index for g in probe.inventory().gpus] == [1, 6]
    with pytest.raises(ProbeUnavailable, match=r"--gpus 1,9: this node has no Ascend GPU 9 "
                                                r"\(it has 0, 1, 2, 3, 4, 5, 6, 7\)"):
        AscendProbe(tool_path=str(tool), gpus=(1, 9))


def test_open_probe_finds_a_tool_on_path_and_applies_gpus(tmp_path: Path, monkeypatch) -> None:
    fake_tool(tmp_path, "cnmon", FAKE_OUTPUTS[CambriconProbe])
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    with open_probe("auto", gpus=(1,)) as probe:      # nvidia, amd, hygon ... passed over
        assert isinstance(probe, CambriconProbe)
        assert [g.uuid for g in probe.inventory().gpus] == ["cambricon-0000:3d:00.0"]
    with pytest.raises(ProbeUnavailable, match="no Cambricon GPU 5"):
        open_probe("auto", gpus=(5,))                 # wrong index: refused, not "no GPUs"


def test_missing_tools_fail_fast_with_a_reason(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))         # nothing on it
    started = time.perf_counter()
    for probe_class in TOOL_PROBES:
        with pytest.raises(ProbeUnavailable) as info:
            probe_class()
        assert str(info.value) == f"{probe_class.tool} is not on PATH ({probe_class.hint})"
    elapsed = time.perf_counter() - started
    print(f"six missing-tool refusals took {elapsed * 1000:.2f} ms")  # no process was started


def test_a_failing_tool_is_refused_with_what_it_said(tmp_path: Path) -> None:
    tool = fake_tool(tmp_path, "mx-smi", {"": "mx-smi-2x-n260.txt"}, exit_code=3)
    with pytest.raises(ProbeUnavailable, match=r"`mx-smi` exited with status 3"):
        MetaxProbe(tool_path=str(tool))
    silent = fake_tool(tmp_path / "empty", "ixsmi", {"*": "ixsmi-query-csv.txt"})
    with pytest.raises(ProbeUnavailable, match="ixsmi reported no Iluvatar device"):
        IluvatarProbe(tool_path=str(silent))          # 6 fields in the file, 8 asked for


def test_a_hung_tool_is_abandoned_after_the_deadline(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(tools, "TOOL_TIMEOUT_S", 0.3)
    tool = fake_tool(tmp_path, "hy-smi", FAKE_OUTPUTS[HygonProbe], sleep_s=5)
    with pytest.raises(ProbeUnavailable, match="did not answer within"):
        HygonProbe(tool_path=str(tool))


def test_auto_with_gpus_but_no_device_is_an_error(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ProbeUnavailable, match="--gpus 0 was given, but no GPU probe found"):
        open_probe("auto", gpus=(0,))
    with pytest.raises(ProbeUnavailable, match="cannot be combined"):
        open_probe("cpu", gpus=(0,))


# --- config and the visibility map ------------------------------------------------------------

def test_gpus_setting(monkeypatch) -> None:
    assert Config.from_sources({}).gpus is None
    assert Config.from_sources({"gpus": "0, 1,1"}).gpus == (0, 1)
    monkeypatch.setenv("GPUMESH_GPUS", "3")
    assert Config.from_sources({}).gpus == (3,)
    assert Config.from_sources({"gpus": "1"}).gpus == (1,)          # the flag wins
    for bad in ("a", "0,-1", ",", "0;1"):
        with pytest.raises(ConfigError, match="--gpus"):
            Config.from_sources({"gpus": bad})
    with pytest.raises(ConfigError, match="cannot be combined"):
        Config.from_sources({"gpus": "0", "gpu_probe": "cpu"})


def test_every_vendor_has_a_probe_and_a_visibility_variable() -> None:
    assert set(GPU_PROBES) == set(VENDORS) == set(VISIBLE_DEVICES_ENV)
    assert visible_devices_env("ascend", [4, 5]) == {"ASCEND_RT_VISIBLE_DEVICES": "4,5"}
    assert visible_devices_env("cambricon", (1,)) == {"MLU_VISIBLE_DEVICES": "1"}
    assert visible_devices_env("mthreads", (0,)) == {"MUSA_VISIBLE_DEVICES": "0"}
    assert visible_devices_env("hygon", (2,)) == {"HIP_VISIBLE_DEVICES": "2"}
    assert visible_devices_env("nvidia", (1, 0)) == {"CUDA_VISIBLE_DEVICES": "1,0",
                                                     "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    with pytest.raises(ValueError, match="unknown accelerator vendor 'tpu'"):
        visible_devices_env("tpu", (0,))
    with pytest.raises(ValueError, match="at least one"):
        visible_devices_env("metax", ())


def test_backends_hand_engines_the_vendors_variable() -> None:
    from gpumesh.backends.base import LaunchRequest
    from gpumesh.backends.base import visible_devices_env as backend_env

    every = frozenset(VENDORS)
    for vendor in VENDORS:
        request = LaunchRequest(model_path="m", served_name="m", port=1, gpu_vendor=vendor,
                                gpu_indices=(2, 3))
        assert backend_env(request, every, "engine") == visible_devices_env(vendor, (2, 3))
    cpu = LaunchRequest(model_path="m", served_name="m", port=1)
    assert backend_env(cpu, every, "engine")["CUDA_VISIBLE_DEVICES"] == "-1"


# --- a real daemon: --gpus, the node record, telemetry ---------------------------------------

def test_daemon_offers_only_its_gpus_and_serves_their_telemetry(tmp_path: Path) -> None:
    tools_dir = tmp_path / "bin"
    fake_tool(tools_dir, "cnmon", FAKE_OUTPUTS[CambriconProbe])
    daemon = Daemon(tmp_path / "node", "--gpu-probe", "cambricon", "--gpus", "1")
    os.environ["PATH"], saved = f"{tools_dir}{os.pathsep}{os.environ['PATH']}", os.environ["PATH"]
    try:
        daemon.start(timeout=60)
    finally:
        os.environ["PATH"] = saved                    # the daemon has inherited it
    try:
        node = daemon.api("/api/nodes")[1]["data"][0]
        assert [(g["index"], g["vendor"]) for g in node["inventory"]["gpus"]] == [(1, "cambricon")]
        assert node["inventory"]["probe"] == "cambricon"
        deadline = time.monotonic() + 20
        while True:
            status, body = daemon.api("/api/telemetry")
            if status == 200 and len(body["samples"]) >= 2:
                break
            assert time.monotonic() < deadline, (status, body)
            time.sleep(0.2)
        sample = body["latest"]
        assert [g["index"] for g in sample["gpus"]] == [1] and sample["error"] is None
        assert body["interval_s"] == 1.0 and body["sampler"]["samples"] >= 2
        assert "offering only GPUs 1 (--gpus)" in daemon.output()
        # The heartbeat carries the sampled GPU memory into the node record.
        deadline = time.monotonic() + 20
        while "gpus" not in daemon.api("/api/nodes")[1]["data"][0].get("resources", {}):
            assert time.monotonic() < deadline, daemon.api("/api/nodes")
            time.sleep(0.2)
        resources = daemon.api("/api/nodes")[1]["data"][0]["resources"]
        assert resources["gpus"] == [{"index": 1, "memory_used_bytes": 0}]
    finally:
        assert daemon.stop() == 0


def test_daemon_refuses_a_gpu_it_does_not_have(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "gpumesh", "up", "--data-dir", str(tmp_path / "d"),
         "--gpus", "0"], capture_output=True, text=True, timeout=60, cwd=tmp_path,
        env={**os.environ, "PATH": str(Path(sys.executable).parent)})
    assert done.returncode == 1, done
    assert "--gpus 0 was given, but no GPU probe found a device" in done.stderr
    assert json.dumps(done.stderr).count("Traceback") == 0


def test_gpu_labels_reach_the_node_record_and_steer_gpu_selectors(tmp_path: Path) -> None:
    fake_tool(tmp_path / "bin", "cnmon", FAKE_OUTPUTS[CambriconProbe])
    daemon = Daemon(tmp_path / "node", "--gpu-probe", "cambricon",
                    "--gpu-label", "0:pool=fast", "--gpu-label", "1:pool=batch")
    os.environ["PATH"], saved = f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}", \
        os.environ["PATH"]
    try:
        daemon.start(timeout=60)
    finally:
        os.environ["PATH"] = saved
    try:
        node = daemon.api("/api/nodes")[1]["data"][0]
        assert node["gpu_labels"] == {"0": {"pool": "fast"}, "1": {"pool": "batch"}}
        body = {"source": str(write_tiny_gguf(tmp_path / "tiny.gguf")), "name": "labelled",
                "backend": "custom", "args": ["my-server", "--port={port}"],
                "placement": {"device": "gpu", "gpu_selector": {"pool": "batch"}}}
        code, answer = daemon.request("POST", "/api/models/evaluate", body)
        assert code == 200 and answer["fits"], answer
        assert answer["replicas"][0]["allocation"]["gpu_indices"] == [1]
        body["placement"]["gpu_selector"] = {"pool": "nowhere"}
        code, answer = daemon.request("POST", "/api/models/evaluate", body)
        assert code == 200 and not answer["fits"], answer
        assert "no ready GPU that custom can use matches the selectors" in answer["summary"]
    finally:
        assert daemon.stop() == 0


def test_a_label_for_a_gpu_the_node_lacks_stops_start_up(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "gpumesh", "up", "--data-dir", str(tmp_path / "d"),
         "--gpu-probe", "cpu", "--gpu-label", "0:pool=batch"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 1, done
    assert "--gpu-label names GPU 0, but this node offers no GPU" in done.stderr
    assert "Traceback" not in done.stderr


# --- telemetry feeds the heartbeat: the scheduler sees what other programs hold -------------

def test_heartbeat_gpu_figures_refresh_the_inventory_the_scheduler_reads() -> None:
    from gpumesh.mesh.commands import apply_command, empty_state

    gpus = [{"index": i, "vendor": "cambricon", "name": "MLU370-X8", "uuid": f"u{i}",
             "memory_total_bytes": 100, "memory_used_bytes": 1} for i in (0, 1)]
    state, _ = apply_command(empty_state(), {"op": "upsert_node", "node": {
        "id": "n1", "name": "a", "status": "ready", "inventory": {"gpus": gpus}}})
    before = state["nodes"]["n1"]
    state, result = apply_command(state, {"op": "node_heartbeat", "id": "n1", "at": 5.0,
                                          "resources": {"memory_available_bytes": 7,
                                                        "gpus": [{"index": 1, "memory_used_bytes": 90}]}})
    assert result["ok"] is True
    after = state["nodes"]["n1"]
    assert [g["memory_used_bytes"] for g in after["inventory"]["gpus"]] == [1, 90]
    assert after["resources"]["gpus"] == [{"index": 1, "memory_used_bytes": 90}]
    assert before["inventory"]["gpus"][1]["memory_used_bytes"] == 1       # copy-on-write
    # Without GPU figures (a failed sample) the last known ones stay.
    state, _ = apply_command(state, {"op": "node_heartbeat", "id": "n1", "at": 7.0,
                                     "resources": {"memory_available_bytes": 7}})
    assert [g["memory_used_bytes"] for g in state["nodes"]["n1"]["inventory"]["gpus"]] == [1, 90]


def test_sampler_hands_the_heartbeat_each_gpus_used_memory(tmp_path: Path) -> None:
    from gpumesh.mesh.telemetry import TelemetrySampler

    tool = fake_tool(tmp_path, "cnmon", FAKE_OUTPUTS[CambriconProbe])
    sampler = TelemetrySampler(interval_s=0.05, keep_s=1.0)
    assert sampler.gpu_memory_used() is None                      # nothing sampled yet
    with CambriconProbe(tool_path=str(tool)) as probe:
        sampler.start(probe)
        try:
            deadline = time.monotonic() + 20
            while sampler.latest() is None:
                assert time.monotonic() < deadline
                time.sleep(0.02)
        finally:
            sampler.stop()
    assert sampler.gpu_memory_used() == [{"index": 0, "memory_used_bytes": 0},
                                         {"index": 1, "memory_used_bytes": 0}]
