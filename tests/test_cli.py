"""The CLI as a new user and a script meet it: a real `gpumesh up` on kernel-chosen ports,
and `gpumesh` run as a separate process with only the environment a shell would have.

Each test names the bug or contract it holds: finding the local node on any port through its
data dir, URLs as people paste them, default names, which naming rule failed, context length
beyond the model's, and the documented exit codes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from harness import Daemon, free_port
from tinymodels import write_tiny_gguf

from gpumesh.mesh.cli import main


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def tiny_model(workdir: Path) -> Path:
    return write_tiny_gguf(workdir / "tiny-chat.gguf")    # trained context: 256 tokens


@pytest.fixture(scope="module")
def node(workdir: Path):
    daemon = Daemon(workdir / "node-data")
    daemon.start()
    yield daemon
    daemon.kill()


def gpumesh(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """`gpumesh ARGS` in a clean shell: no GPUMESH_* unless given, and a home whose default
    data dir is empty (so nothing is found by accident)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("GPUMESH_")}
    clean.update({"XDG_DATA_HOME": str(cwd / "empty-home"), "NO_COLOR": "", "FORCE_COLOR": ""})
    clean.update(env)
    return subprocess.run([sys.executable, "-m", "gpumesh", *args], env=clean, cwd=cwd,
                          capture_output=True, text=True, timeout=120)


# --- finding the node --------------------------------------------------------------------

def test_the_local_node_is_found_on_any_port_through_its_data_dir(node: Daemon,
                                                                   workdir: Path) -> None:
    assert node.api_port != 8470
    endpoint = json.loads((node.data_dir / "endpoint.json").read_text())
    assert endpoint["connect_url"] == node.url and endpoint["pid"] == node.process.pid
    result = gpumesh("status", "--json", cwd=workdir, GPUMESH_DATA_DIR=str(node.data_dir))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["raft"]["is_leader"]


@pytest.mark.parametrize("form", ["{url}/v1", "{url}/v1/", "127.0.0.1:{port}", "{url}/api"])
def test_urls_as_people_paste_them(node: Daemon, workdir: Path, form: str) -> None:
    url = form.format(url=node.url, port=node.api_port)
    result = gpumesh("models", "--json", cwd=workdir, GPUMESH_URL=url,
                     GPUMESH_DATA_DIR=str(node.data_dir))      # the key from the data dir
    assert result.returncode == 0, result.stderr
    assert isinstance(json.loads(result.stdout), list)


def test_a_url_without_any_key_says_where_keys_come_from(node: Daemon, workdir: Path) -> None:
    result = gpumesh("models", cwd=workdir, GPUMESH_URL=f"127.0.0.1:{node.api_port}")
    assert result.returncode == 4, result.stderr                       # not authorised
    assert "set GPUMESH_API_KEY" in result.stderr and "GPUMESH_DATA_DIR" in result.stderr


def test_unreachable_and_wrong_key_and_bad_url_exit_codes(node: Daemon, workdir: Path) -> None:
    closed = gpumesh("models", "--url", f"127.0.0.1:{free_port()}", "--api-key", "gm-x-y",
                     cwd=workdir)
    assert closed.returncode == 5 and "cannot reach gpumesh" in closed.stderr
    wrong = gpumesh("models", "--url", node.url, "--api-key", "gm-nope-nope", cwd=workdir)
    assert wrong.returncode == 4 and "the key came from --api-key" in wrong.stderr
    bad = gpumesh("models", "--url", "ftp://host", cwd=workdir)
    assert bad.returncode == 2 and "http:// or https://" in bad.stderr
    never_ran = gpumesh("models", cwd=workdir, GPUMESH_DATA_DIR=str(workdir / "never-ran"))
    assert never_ran.returncode == 5 and "no node has run with the data dir" in never_ran.stderr


# --- deploying: names, context, exit codes -----------------------------------------------

def test_deploy_without_name_uses_the_file_name(node: Daemon, workdir: Path,
                                                tiny_model: Path) -> None:
    env = {"GPUMESH_DATA_DIR": str(node.data_dir)}
    result = gpumesh("deploy", tiny_model.name, "--json", cwd=workdir, **env)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["name"] == "tiny-chat"
    shown = gpumesh("show", "tiny-chat", "--json", cwd=workdir, **env)
    assert json.loads(shown.stdout)["source"]["path"] == str(tiny_model)
    assert gpumesh("rm", "tiny-chat", cwd=workdir, **env).returncode == 0


@pytest.mark.parametrize(("name", "rule"), [
    ("n" * 300, "300 characters long; the most is 128"),
    ("modèle", "'è' at position 4: names are ASCII"),
    ("模型", "'模' at position 1: names are ASCII"),
])
def test_each_bad_name_gets_the_rule_it_broke(node: Daemon, workdir: Path, tiny_model: Path,
                                              name: str, rule: str) -> None:
    result = gpumesh("deploy", str(tiny_model), "--name", name, cwd=workdir,
                     GPUMESH_DATA_DIR=str(node.data_dir))
    assert result.returncode == 2 and rule in result.stderr, result.stderr


def test_context_beyond_the_models_is_refused(node: Daemon, workdir: Path,
                                              tiny_model: Path) -> None:
    result = gpumesh("deploy", str(tiny_model), "--context-length", "999999", "--json",
                     cwd=workdir, GPUMESH_DATA_DIR=str(node.data_dir))
    assert result.returncode == 2
    assert "more than this model was trained for (256 tokens): give at most 256" in result.stderr
    error = json.loads(result.stdout)["error"]              # --json: stdout is JSON even now
    assert error["exit_code"] == 2 and error["code"] == "invalid_deployment"
    code, models = node.api("/api/models")
    assert models["data"] == []                             # nothing stored


def test_not_found_and_timed_out_exit_codes(node: Daemon, workdir: Path,
                                            tiny_model: Path) -> None:
    env = {"GPUMESH_DATA_DIR": str(node.data_dir)}
    missing = gpumesh("show", "absent", "--json", cwd=workdir, **env)
    assert missing.returncode == 3 and json.loads(missing.stdout)["error"]["exit_code"] == 3
    assert gpumesh("rm", "absent", cwd=workdir, **env).returncode == 3
    assert gpumesh("rm", "absent", "--ignore-missing", cwd=workdir, **env).returncode == 0
    assert gpumesh("scale", "absent", "2", cwd=workdir, **env).returncode == 3
    # Three engine processes cannot all be up in the instant after the deploy is committed.
    slow = gpumesh("deploy", str(tiny_model), "--name", "three", "--replicas", "3", "--wait",
                   "--timeout", "0", "--json", cwd=workdir, **env)
    assert slow.returncode == 6, slow.stderr
    assert "three is not running after 0 s" in slow.stderr
    assert json.loads(slow.stdout)["model"]["name"] == "three"   # the state it gave up on
    assert gpumesh("rm", "three", cwd=workdir, **env).returncode == 0


def test_a_table_for_people_has_no_escape_codes_in_a_pipe(node: Daemon, workdir: Path) -> None:
    result = gpumesh("nodes", cwd=workdir, GPUMESH_DATA_DIR=str(node.data_dir))
    assert result.stdout.startswith("ID") and "\x1b[" not in result.stdout
    forced = gpumesh("nodes", cwd=workdir, GPUMESH_DATA_DIR=str(node.data_dir), FORCE_COLOR="1")
    assert "\x1b[32mready\x1b[0m" in forced.stdout
    both = gpumesh("nodes", cwd=workdir, GPUMESH_DATA_DIR=str(node.data_dir), FORCE_COLOR="1",
                   NO_COLOR="1")
    assert "\x1b[" not in both.stdout


# --- help and usage (in-process: no node needed) -----------------------------------------

def test_bare_gpumesh_prints_help_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    err = capsys.readouterr().err
    assert "usage: gpumesh" in err and "5    unreachable" in err


@pytest.mark.parametrize(("argv", "expected"), [
    (["up", "--help"], "how much the daemon logs"),
    (["rm", "--help"], "NAME the model's name"),
    (["scale", "--help"], "REPLICAS instances wanted"),
    (["--help"], "7 not schedulable"),
])
def test_help_texts(capsys: pytest.CaptureFixture[str], argv: list[str], expected: str) -> None:
    with pytest.raises(SystemExit) as done:
        main(argv)
    assert done.value.code == 0
    assert expected in " ".join(capsys.readouterr().out.split())


def test_every_command_has_help_json_and_the_documented_exit_codes() -> None:
    """Every command says what it does; every one that prints data has --json (all but the
    daemon, the console and the completion script); `gpumesh --help` lists every exit code."""
    from gpumesh.mesh.cli import build_parser
    from gpumesh.mesh.cli.output import EXIT_CODES_HELP, Exit
    from gpumesh.mesh.cli.reference import list_commands
    commands = list_commands(build_parser(), [])
    assert len(commands) > 20
    assert [" ".join(path) for path, help_, _ in commands if not help_] == []
    without_json = [" ".join(path) for path, _, parser in commands
                    if "--json" not in parser._option_string_actions]   # noqa: SLF001
    assert without_json == ["up", "tui", "completion"]
    for code in Exit:
        assert re.search(rf"^  {int(code)}\s+\S", EXIT_CODES_HELP, re.M), code
    # A value is named for people (SECONDS, MIB), never after the setting's field (…_S).
    internal = [f"{' '.join(path)} {action.option_strings[-1]}" for path, _, parser in commands
                for action in parser._actions                          # noqa: SLF001
                if action.option_strings and action.nargs != 0 and action.metavar is None
                and re.search(r"_(s|mib)$", action.dest)]
    assert internal == []


def test_every_argument_of_every_command_has_help_and_groups_alone_exit_2(
        capsys: pytest.CaptureFixture[str]) -> None:
    import argparse
    from gpumesh.mesh.cli import build_parser
    missing, groups = [], []

    def walk(parser: argparse.ArgumentParser, path: list[str]) -> None:
        for action in parser._actions:                                    # noqa: SLF001
            if isinstance(action, argparse._SubParsersAction):            # noqa: SLF001
                if path:
                    groups.append(path)
                for name, sub in action.choices.items():
                    walk(sub, path + [name])
            elif not isinstance(action, argparse._HelpAction) and not action.help:  # noqa: SLF001
                missing.append(f"{' '.join(path)} {'/'.join(action.option_strings) or action.dest}")

    walk(build_parser(), [])
    assert missing == []
    assert ["node"] in groups and ["keys"] in groups
    for path in groups:
        if path in (["models"], ["ls"]):
            continue                      # `gpumesh models` alone lists the models
        assert main(path) == 2, path
        assert f"{path[-1]} [-h] COMMAND" in capsys.readouterr().err


@pytest.mark.parametrize(("given", "expected"), [
    ("10.0.0.5", "http://10.0.0.5:8470"),
    ("10.0.0.5:18470", "http://10.0.0.5:18470"),
    ("http://10.0.0.5:8470/v1", "http://10.0.0.5:8470"),
    ("http://10.0.0.5:8470/v1/", "http://10.0.0.5:8470"),
    ("https://mesh.example.com/gpumesh/api", "https://mesh.example.com/gpumesh"),
    ("https://mesh.example.com", "https://mesh.example.com"),      # a scheme keeps its port
    ("[::1]:8470", "http://[::1]:8470"),
    ("  node-1:8470/v1  ", "http://node-1:8470"),
])
def test_url_forms(given: str, expected: str) -> None:
    from gpumesh.mesh.client import normalise_url
    assert normalise_url(given) == expected


@pytest.mark.parametrize(("given", "problem"), [
    ("ftp://host", "http:// or https://"), ("host:port", "invalid port"),
    ("http://", "names no host")])
def test_bad_urls_say_why(given: str, problem: str) -> None:
    from gpumesh.mesh.client import normalise_url
    with pytest.raises(ValueError, match=problem):
        normalise_url(given)


# --- deploy -f: spec files ----------------------------------------------------------------

SPEC = """\
# two models from one file; paths are relative to the file
models:
  - source: ./tiny-chat.gguf
    replicas: 1
  - name: spare
    source: tiny-chat.gguf
    replicas: 0
    context_length: 128
"""


def test_a_spec_file_applied_twice_changes_nothing(node: Daemon, workdir: Path,
                                                   tiny_model: Path) -> None:
    env = {"GPUMESH_DATA_DIR": str(node.data_dir)}
    spec = workdir / "spec.yaml"
    spec.write_text(SPEC)
    elsewhere = workdir / "a-shell-elsewhere"
    elsewhere.mkdir()
    first = gpumesh("deploy", "-f", str(spec), "--wait", "--timeout", "60", "--json",
                    cwd=elsewhere, **env)
    assert first.returncode == 0, first.stderr
    assert [(s["name"], s["action"]) for s in json.loads(first.stdout)] == [
        ("tiny-chat", "create"), ("spare", "create")]
    before = node.api("/api/models")[1]["data"]
    assert [m["status"] for m in before] == ["stopped", "running"]          # sorted by name

    again = gpumesh("deploy", "-f", str(spec), cwd=elsewhere, **env)
    assert again.returncode == 0, again.stderr
    assert again.stdout.splitlines() == ["tiny-chat: unchanged", "spare: unchanged"]
    assert node.api("/api/models")[1]["data"] == before                     # same records, same instances

    spec.write_text(SPEC.replace("replicas: 0", "replicas: 2"))
    scaled = gpumesh("deploy", "-f", str(spec), cwd=elsewhere, **env)
    assert "spare: scaled 0 → 2 replica(s)" in scaled.stdout
    assert node.api("/api/models/spare")[1]["created"] == before[0]["created"]

    spec.write_text(SPEC.replace("replicas: 0", "replicas: 2").replace("context_length: 128",
                                                                      "context_length: 64"))
    changed = gpumesh("deploy", "-f", str(spec), cwd=elsewhere, **env)
    assert changed.returncode == 1
    assert f"{spec}:8: model 'spare' exists with other settings (context_length 128 → 64)" \
        in changed.stderr and "--replace" in changed.stderr
    assert node.api("/api/models/spare")[1]["replicas"] == 2               # refused before any change
    replaced = gpumesh("deploy", "-f", str(spec), "--replace", cwd=elsewhere, **env)
    assert replaced.returncode == 0 and "spare: replaced" in replaced.stdout
    assert node.api("/api/models/spare")[1]["context_length"] == 64
    for name in ("spare", "tiny-chat"):
        assert gpumesh("rm", name, cwd=workdir, **env).returncode == 0


@pytest.mark.parametrize(("text", "line", "message"), [
    ("source: tiny-chat.gguf\nreplica: 2\n", 2, "unknown field 'replica' (did you mean 'replicas'?)"),
    ("source: tiny-chat.gguf\nname: ok\nname: again\n", 3, "'name' appears twice (first on line 2)"),
    ("models:\n  - name: a\n    source: tiny-chat.gguf\n  - name: a\n    source: x/y\n", 4,
     "model 'a' is also described on line 2"),
    ("name: tiny\nsource: [unclosed\n", 3, "not valid YAML"),
    ("name: n1\nsource: ./absent.gguf\n", 2, "does not exist"),
    ("models:\n  - name: n2\n    source: tiny-chat.gguf\n    replicas: 65\n", 4,
     "n2: replicas must be a whole number from 0 to 64"),            # the node's own check
    ("models:\n- source: tiny-chat.gguf\n  name: 模型\n", 3, "names are ASCII"),
])
def test_spec_file_errors_name_the_line(node: Daemon, workdir: Path, tiny_model: Path,
                                        text: str, line: int, message: str) -> None:
    spec = workdir / "bad.yaml"
    spec.write_text(text)
    result = gpumesh("deploy", "-f", str(spec), cwd=workdir, GPUMESH_DATA_DIR=str(node.data_dir))
    assert result.returncode == 2, result.stderr
    assert f"{spec}:{line}: " in result.stderr and message in result.stderr, result.stderr
    assert node.api("/api/models")[1]["data"] == []


# --- version, doctor, completion ----------------------------------------------------------

def test_version_names_the_client_and_every_node(node: Daemon, workdir: Path) -> None:
    result = gpumesh("version", "--json", cwd=workdir, GPUMESH_DATA_DIR=str(node.data_dir))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    from gpumesh import __version__
    assert report["client"]["version"] == __version__
    assert report["node"] == {"url": node.url, "version": __version__}
    assert [n["version"] for n in report["nodes"]] == [__version__]
    away = gpumesh("version", "--url", f"127.0.0.1:{free_port()}", cwd=workdir)
    assert away.returncode == 0 and "node: not reachable (cannot reach gpumesh" in away.stdout


def test_doctor_reads_a_real_nodes_ports(node: Daemon, workdir: Path) -> None:
    args = ("doctor", "--json", "--data-dir", str(node.data_dir), "--discovery", "off")
    ours = gpumesh(*args, "--api-port", str(node.api_port), "--raft-port",
                   str(node.raft_port), cwd=workdir)
    report = json.loads(ours.stdout)
    checks = {c["name"]: c for c in report["checks"]}
    assert {"python", "api port", "raft port", "mdns", "disk", "memory", "data dir",
            "engine:llama.cpp", "node"} <= set(checks)
    assert all(set(c) == {"name", "status", "summary", "fix", "details"}
               for c in report["checks"])
    assert checks["api port"]["status"] == "ok"
    assert f"running gpumesh (pid {node.process.pid})" in checks["api port"]["summary"]
    assert checks["raft port"]["details"]["pid"] == node.process.pid
    assert checks["node"]["details"]["url"] == node.url
    assert checks["engine:llama.cpp"]["status"] == "ok"
    assert ours.returncode == (1 if report["problems"] else 0)
    with socket.socket() as squatter:                   # a port someone else holds
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        busy = gpumesh(*args, "--api-port", str(taken), "--raft-port", str(free_port()),
                       cwd=workdir)
    assert busy.returncode == 1
    check = next(c for c in json.loads(busy.stdout)["checks"] if c["name"] == "api port")
    assert check["status"] == "fail" and f"sport = :{taken}" in check["fix"]
    assert "--api-port" in check["fix"]


BASH_COMPLETE = """
source <(gpumesh completion bash)
complete -p gpumesh
comp() { COMP_WORDS=("$@"); COMP_CWORD=$((${#COMP_WORDS[@]} - 1)); COMPREPLY=(); _gpumesh
         echo "${COMPREPLY[*]}"; }
comp gpumesh dep
comp gpumesh deploy --na
comp gpumesh up --log-level ""
comp gpumesh rm ""
"""


def test_bash_completion_loads_and_completes_commands_flags_and_live_names(
        node: Daemon, workdir: Path, tiny_model: Path) -> None:
    env = {"GPUMESH_DATA_DIR": str(node.data_dir),
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    assert gpumesh("deploy", str(tiny_model), "--name", "listed", "--replicas", "0",
                   cwd=workdir, **env).returncode == 0
    try:
        result = subprocess.run(["bash", "-c", BASH_COMPLETE], capture_output=True, text=True,
                                timeout=60, cwd=workdir, env={**os.environ, **env})
    finally:
        gpumesh("rm", "listed", cwd=workdir, **env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["complete -o default -F _gpumesh gpumesh", "deploy",
                                          "--name", "debug info warning error", "listed"]


@pytest.mark.skipif(shutil.which("fish") is None, reason="fish is not installed")
def test_fish_completion_completes(workdir: Path) -> None:
    script = workdir / "gpumesh.fish"
    script.write_text(gpumesh("completion", "fish", cwd=workdir).stdout)
    result = subprocess.run(["fish", "-c", f"source {script}; complete -C 'gpumesh dep'; "
                             "complete -C 'gpumesh up --log-level '"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    words = [line.split("\t")[0] for line in result.stdout.splitlines()]
    assert words == ["deploy", "debug", "error", "info", "warning"]


@pytest.mark.skipif(shutil.which("zsh") is None, reason="zsh is not installed")
def test_zsh_completion_loads(workdir: Path) -> None:
    script = workdir / "_gpumesh"
    script.write_text(gpumesh("completion", "zsh", cwd=workdir).stdout)
    assert subprocess.run(["zsh", "-n", str(script)], timeout=30).returncode == 0
    result = subprocess.run(["zsh", "-f", "-c", f"autoload -U compinit; compinit -u -D; "
                             f"source {script}; print -r -- $_comps[gpumesh]; "
                             f"whence -w _gpumesh_deploy _gpumesh_node_drain"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["_gpumesh", "_gpumesh_deploy:", "function",
                                     "_gpumesh_node_drain:", "function"]


def test_a_spec_file_dry_run_plans_and_stores_nothing(node: Daemon, workdir: Path,
                                                      tiny_model: Path) -> None:
    env = {"GPUMESH_DATA_DIR": str(node.data_dir)}
    huge = workdir / "huge.gguf"                      # a sparse 4 TiB file: no disk used
    huge.write_bytes(tiny_model.read_bytes())
    os.truncate(huge, 4 << 40)
    spec = workdir / "plan.yaml"
    spec.write_text(f"models:\n  - name: planned\n    source: {tiny_model}\n"
                    f"  - name: huge\n    source: {huge}\n")
    result = gpumesh("deploy", "-f", str(spec), "--dry-run", "--json", cwd=workdir, **env)
    assert result.returncode == 7, result.stderr                 # not schedulable
    verdicts = {v["name"]: v for v in json.loads(result.stdout)}
    assert verdicts["planned"]["action"] == "create" and verdicts["planned"]["fits"] is True
    assert verdicts["huge"]["fits"] is False and verdicts["huge"]["summary"]
    assert node.api("/api/models")[1]["data"] == []               # nothing stored


# A Ctrl-C that an import swallows (an extension module clearing the error its optional
# import raised clears a KeyboardInterrupt too): simulated here by catching it where it lands,
# while the CLI imports (before main) or while `up` imports the daemon.
_SWALLOWED = """
import os, signal, sys
import gpumesh.interrupts

def lose_a_ctrl_c():
    try:
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(10000):
            pass
    except BaseException:
        pass

if sys.argv[1] == "importing-the-cli":
    gpumesh.interrupts.remember_interrupts()
    lose_a_ctrl_c()
    from gpumesh.mesh.cli import main
else:
    from gpumesh.mesh.cli import main
    import gpumesh.mesh.cli.daemon as up
    remember = up.remember_interrupts
    up.remember_interrupts = lambda: (remember(), lose_a_ctrl_c())
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize("where", ["importing-the-cli", "importing-the-daemon"])
def test_a_ctrl_c_an_import_swallowed_still_stops_up(workdir: Path, where: str) -> None:
    data_dir = workdir / f"swallowed-{where}"
    result = subprocess.run(
        [sys.executable, "-c", _SWALLOWED, where, "up", "--data-dir", str(data_dir),
         "--api-port", str(free_port()), "--raft-port", str(free_port())],
        capture_output=True, text=True, timeout=30)   # without the check: a daemon running on
    assert result.returncode == 130, result.stdout + result.stderr
    assert not data_dir.exists()                  # nothing started
