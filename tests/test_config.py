"""Unit tests for mesh/config.py: defaults, environment, flags, and validation in words."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gpumesh.mesh.config import (
    DEFAULT_API_PORT,
    DEFAULT_RAFT_PORT,
    Config,
    ConfigError,
    default_data_dir,
    primary_address,
)

ENV_NAMES = ("GPUMESH_DATA_DIR", "XDG_DATA_HOME", "GPUMESH_HOST", "GPUMESH_API_PORT",
             "GPUMESH_RAFT_PORT", "GPUMESH_NODE_NAME", "GPUMESH_GPU_PROBE",
             "GPUMESH_RESERVED_MEMORY_MIB", "GPUMESH_LOG_LEVEL", "GPUMESH_MEMORY_LIMIT_MIB",
             "GPUMESH_IMAGE_FETCH")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    """No GPUMESH_* or XDG setting leaks in from the machine; HOME is a scratch folder."""
    for name in ENV_NAMES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


def _error(flags: dict | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        Config.from_sources(flags or {})
    return str(info.value)


# --- data dir ------------------------------------------------------------------------------

def test_default_data_dir_is_under_home(tmp_path):
    assert default_data_dir() == tmp_path / "home" / ".local" / "share" / "gpumesh"


def test_default_data_dir_honours_xdg_data_home(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert default_data_dir() == tmp_path / "xdg" / "gpumesh"


def test_empty_xdg_data_home_is_ignored(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_DATA_HOME", "")
    assert default_data_dir() == tmp_path / "home" / ".local" / "share" / "gpumesh"


def test_gpumesh_data_dir_beats_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("GPUMESH_DATA_DIR", str(tmp_path / "mine"))
    assert default_data_dir() == tmp_path / "mine"        # used as is: no "gpumesh" appended


def test_gpumesh_data_dir_expands_tilde(monkeypatch, tmp_path):
    monkeypatch.setenv("GPUMESH_DATA_DIR", "~/cluster")
    assert default_data_dir() == tmp_path / "home" / "cluster"


def test_config_data_dir_comes_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("GPUMESH_DATA_DIR", str(tmp_path / "env-dir"))
    assert Config.from_sources({}).data_dir == (tmp_path / "env-dir").resolve()


def test_data_dir_flag_beats_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("GPUMESH_DATA_DIR", str(tmp_path / "env-dir"))
    config = Config.from_sources({"data_dir": str(tmp_path / "flag-dir")})
    assert config.data_dir == (tmp_path / "flag-dir").resolve()


def test_data_dir_is_made_absolute(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    config = Config.from_sources({"data_dir": "relative/dir"})
    assert config.data_dir.is_absolute()
    assert config.data_dir == (tmp_path / "relative" / "dir").resolve()


def test_data_dir_flag_expands_tilde(tmp_path):
    config = Config.from_sources({"data_dir": "~/d"})
    assert config.data_dir == (tmp_path / "home" / "d").resolve()


# --- defaults ------------------------------------------------------------------------------

def test_defaults():
    config = Config.from_sources({})
    assert config.host == "127.0.0.1"
    assert config.api_port == DEFAULT_API_PORT == 8470
    assert config.raft_port == DEFAULT_RAFT_PORT == 8471
    assert config.node_name == os.uname().nodename
    assert config.gpu_probe == "auto"
    assert config.reserved_memory_mib == 1024
    assert config.log_level == "info"
    assert config.api_url == "http://127.0.0.1:8470"
    assert config.raft_address == "127.0.0.1:8471"
    assert isinstance(config.data_dir, Path)


def test_flags_that_are_none_are_ignored():
    config = Config.from_sources({"api_port": None, "host": None, "log_level": None})
    assert (config.api_port, config.host, config.log_level) == (8470, "127.0.0.1", "info")


# --- environment and flags -----------------------------------------------------------------

def test_environment_overrides_defaults(monkeypatch):
    monkeypatch.setenv("GPUMESH_HOST", "0.0.0.0")
    monkeypatch.setenv("GPUMESH_API_PORT", "9000")
    monkeypatch.setenv("GPUMESH_RAFT_PORT", "9001")
    monkeypatch.setenv("GPUMESH_NODE_NAME", "box-1")
    monkeypatch.setenv("GPUMESH_GPU_PROBE", "cpu")
    monkeypatch.setenv("GPUMESH_RESERVED_MEMORY_MIB", "2048")
    monkeypatch.setenv("GPUMESH_LOG_LEVEL", "DEBUG")
    config = Config.from_sources({})
    assert config.host == "0.0.0.0"
    assert config.api_port == 9000 and isinstance(config.api_port, int)
    assert config.raft_port == 9001 and isinstance(config.raft_port, int)
    assert config.node_name == "box-1"
    assert config.gpu_probe == "cpu"
    assert config.reserved_memory_mib == 2048 and isinstance(config.reserved_memory_mib, int)
    assert config.log_level == "debug"                     # lower-cased
    # Bound everywhere: peers are told the primary interface's address (never 0.0.0.0).
    assert config.advertise == primary_address() != "0.0.0.0"
    assert config.api_url == f"http://{config.advertise}:9000"
    assert config.raft_address == f"{config.advertise}:9001"


def test_flags_override_the_environment(monkeypatch):
    monkeypatch.setenv("GPUMESH_API_PORT", "9000")
    monkeypatch.setenv("GPUMESH_NODE_NAME", "from-env")
    monkeypatch.setenv("GPUMESH_LOG_LEVEL", "error")
    config = Config.from_sources({"api_port": 9100, "node_name": "from-flag"})
    assert config.api_port == 9100
    assert config.node_name == "from-flag"
    assert config.log_level == "error"                     # env kept where no flag is given


def test_raft_host_defaults_to_host_and_can_differ(monkeypatch):
    assert Config.from_sources({"host": "10.0.0.5"}).raft_address == "10.0.0.5:8471"
    config = Config.from_sources({"host": "0.0.0.0", "raft_host": "10.1.0.5"})
    assert (config.host, config.raft_host, config.raft_address) == \
        ("0.0.0.0", "10.1.0.5", "10.1.0.5:8471")
    monkeypatch.setenv("GPUMESH_RAFT_HOST", "10.2.0.5")
    assert Config.from_sources({}).raft_address == "10.2.0.5:8471"
    with pytest.raises(ConfigError, match="--raft-host must be an IP address"):
        Config.from_sources({"raft_host": "cluster.example"})


def test_ipv6_host_is_accepted():
    assert Config.from_sources({"host": "::1"}).host == "::1"


@pytest.mark.parametrize("probe", ["auto", "nvidia", "amd", "cpu"])
def test_every_gpu_probe_is_accepted(probe):
    assert Config.from_sources({"gpu_probe": probe}).gpu_probe == probe


@pytest.mark.parametrize("port", [1, 65535])
def test_port_bounds_are_inclusive(port):
    other = 2 if port == 1 else 65534
    config = Config.from_sources({"api_port": port, "raft_port": other})
    assert (config.api_port, config.raft_port) == (port, other)


def test_reserved_memory_zero_is_allowed():
    assert Config.from_sources({"reserved_memory_mib": 0}).reserved_memory_mib == 0


def test_node_name_of_63_characters_is_allowed():
    assert Config.from_sources({"node_name": "n" * 63}).node_name == "n" * 63


# --- validation errors name the flag -------------------------------------------------------

@pytest.mark.parametrize("flag, value", [
    ("api_port", 0), ("api_port", -1), ("api_port", 65536), ("api_port", 100000),
    ("raft_port", 0), ("raft_port", 70000),
])
def test_port_out_of_range(flag, value):
    message = _error({flag: value})
    assert "--" + flag.replace("_", "-") in message
    assert str(value) in message


def test_port_above_range_says_the_range():
    assert "1-65535" in _error({"api_port": 65536})


@pytest.mark.parametrize("flag, value", [
    ("api_port", "http"), ("raft_port", "80a"), ("api_port", ""), ("api_port", "8470.5"),
    ("reserved_memory_mib", "lots"),
])
def test_non_numeric_values(flag, value):
    message = _error({flag: value})
    assert "--" + flag.replace("_", "-") in message
    assert "whole number" in message
    assert repr(value) in message


def test_non_numeric_port_from_the_environment_names_the_flag(monkeypatch):
    monkeypatch.setenv("GPUMESH_RAFT_PORT", "eighty")
    message = _error()
    assert "--raft-port" in message and "'eighty'" in message


def test_a_memory_limit_caps_what_the_node_record_offers(monkeypatch):
    from gpumesh.mesh.membership import _capped
    assert Config.from_sources({}).memory_limit_mib is None
    monkeypatch.setenv("GPUMESH_MEMORY_LIMIT_MIB", "512")
    assert Config.from_sources({}).memory_limit_mib == 512
    assert "--memory-limit-mib" in _error({"memory_limit_mib": 0})
    record = {"memory_total_bytes": 24 << 30, "memory_available_bytes": 200 << 20, "cpu_cores": 2}
    assert _capped(record, 512 << 20) == {"memory_total_bytes": 512 << 20,    # the machine has
                                          "memory_available_bytes": 200 << 20,  # less free
                                          "cpu_cores": 2}
    assert _capped(record, None) is record


def test_negative_reserved_memory():
    message = _error({"reserved_memory_mib": -1})
    assert "--reserved-memory-mib" in message and "at least 0" in message


def test_equal_ports():
    message = _error({"api_port": 9000, "raft_port": 9000})
    assert "--api-port" in message and "--raft-port" in message and "9000" in message


def test_equal_ports_via_default(monkeypatch):
    message = _error({"raft_port": DEFAULT_API_PORT})
    assert "--api-port and --raft-port must differ" in message


@pytest.mark.parametrize("host", ["localhost", "example.com", "256.1.1.1", "", "1.2.3"])
def test_bad_host(host):
    message = _error({"host": host})
    assert "--host" in message and repr(host) in message


def test_bad_host_from_the_environment(monkeypatch):
    monkeypatch.setenv("GPUMESH_HOST", "my-laptop")
    message = _error()
    assert "--host must be an IP address" in message and "'my-laptop'" in message


@pytest.mark.parametrize("probe", ["cuda", "NVIDIA-X", "", "gpu"])
def test_bad_gpu_probe(probe):
    message = _error({"gpu_probe": probe})
    assert "--gpu-probe" in message
    assert "auto, nvidia, amd, hygon, ascend, mthreads, iluvatar, metax, cambricon, cpu" in message
    assert "default auto" in message
    assert repr(probe) in message


@pytest.mark.parametrize("level", ["verbose", "trace", "critical", "0"])
def test_bad_log_level(level):
    message = _error({"log_level": level})
    assert "--log-level" in message
    assert "default info" in message
    assert repr(level) in message


def test_log_level_is_case_insensitive():
    assert Config.from_sources({"log_level": "WARNING"}).log_level == "warning"


def test_node_name_too_long():
    message = _error({"node_name": "n" * 64})
    assert "--node-name" in message and "63" in message


def test_empty_node_name_from_the_environment(monkeypatch):
    monkeypatch.setenv("GPUMESH_NODE_NAME", "")
    assert "--node-name" in _error()


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


def test_labels_come_from_flags_or_the_environment_and_refuse_bad_keys(monkeypatch):
    from gpumesh.mesh.config import Config, ConfigError
    assert Config.from_sources({"labels": ["zone=eu", "tier=fast,gpu=h100"]}).labels == {
        "zone": "eu", "tier": "fast", "gpu": "h100"}
    monkeypatch.setenv("GPUMESH_LABELS", "rack=r7")
    assert Config.from_sources({}).labels == {"rack": "r7"}
    for bad in (["zone"], ["=x"], ["name=x"], ["a b=c"]):
        with pytest.raises(ConfigError, match="--label"):
            Config.from_sources({"labels": bad})


def test_gpu_labels_by_index_from_flags_or_the_environment(monkeypatch):
    from gpumesh.mesh.config import Config, ConfigError
    config = Config.from_sources({"gpu_labels": ["0:pool=batch", "1:pool=fast,1:tier=a"]})
    assert config.gpu_labels == {"0": {"pool": "batch"}, "1": {"pool": "fast", "tier": "a"}}
    monkeypatch.setenv("GPUMESH_GPU_LABELS", "03:pool=x")
    assert Config.from_sources({}).gpu_labels == {"3": {"pool": "x"}}
    for bad, words in ((["pool=x"], "INDEX:KEY=VALUE"), (["a:pool=x"], "INDEX:KEY=VALUE"),
                       (["0:pool"], "INDEX:KEY=VALUE"), (["0:name=x"], "match the GPU's name")):
        with pytest.raises(ConfigError, match=words):
            Config.from_sources({"gpu_labels": bad})


def test_wake_timeout_is_seconds_with_a_default(monkeypatch):
    from gpumesh.mesh.config import Config, ConfigError
    assert Config.from_sources({}).wake_timeout_s == 120.0
    assert Config.from_sources({"wake_timeout_s": 7.5}).wake_timeout_s == 7.5
    monkeypatch.setenv("GPUMESH_WAKE_TIMEOUT", "30")
    assert Config.from_sources({}).wake_timeout_s == 30.0
    with pytest.raises(ConfigError, match="--wake-timeout must be more than 0"):
        Config.from_sources({"wake_timeout_s": 0})


# --- the gateway's image fetching ----------------------------------------------------------

def test_image_fetch_reaches_the_gateway_settings(monkeypatch):
    assert Config.from_sources({}).gateway_settings().image_fetch == "public"
    monkeypatch.setenv("GPUMESH_IMAGE_FETCH", "ANY")
    assert Config.from_sources({}).gateway_settings().image_fetch == "any"
    assert Config.from_sources({"image_fetch": "off"}).gateway_settings().image_fetch == "off"
    assert "--image-fetch must be off, public or any (default public), got 'all'" in \
        _error({"image_fetch": "all"})
