"""README.md says what is true: its CLI reference is the parser's, its test command is the one
CI runs, its console picture is the snapshot test's, and every file it links to exists."""

from __future__ import annotations

import re
from pathlib import Path

from gpumesh.mesh.cli.reference import BEGIN, END, cli_reference, replace_block

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _section(title: str) -> str:
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start:end if end != -1 else None]


def _commands(section: str) -> list[str]:
    return [block.strip() for block in re.findall(r"```sh\n(.*?)```", section, re.S)]


def test_the_cli_reference_is_the_parsers() -> None:
    block = README[README.index(BEGIN) + len(BEGIN):README.index(END)].strip("\n")
    assert block == cli_reference(), (
        "README's CLI reference is out of date: run "
        "`.venv/bin/python -m gpumesh.mesh.cli.reference --write README.md`")
    assert replace_block(README, block) == README


def test_the_two_commands_are_what_ci_runs() -> None:
    install, tests = _commands(_section("Two commands"))[:2]
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert tests in ci, "the README's test command must be exactly a line of .ci/run"
    assert install.startswith("python3 -m venv .venv && .venv/bin/pip install -e . && ")
    assert install.endswith(" .venv/bin/gpumesh up")
    assert "python3 -m venv .venv" in ci and ".venv/bin/pip install -q -e ." in " ".join(ci)


def test_the_console_picture_is_the_snapshot_tests() -> None:
    picture = re.search(r"!\[[^]]*\]\((docs/[^)]+\.svg)\)", _section("The console"))
    assert picture, "the console section shows an SVG from docs/"
    snapshots = list((ROOT / "tests" / "__snapshots__").rglob("*.svg"))
    shown = (ROOT / picture.group(1)).read_bytes()
    assert any(s.read_bytes() == shown for s in snapshots), (
        f"{picture.group(1)} is no longer a snapshot test's output: copy the new one over it")


def test_every_linked_file_exists_and_packaging_is_referenced() -> None:
    links = re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", README)
    assert links
    missing = [link for link in links if not (ROOT / link).exists()]
    assert missing == []
    for path in ("packaging/INSTALL.md", "packaging/Dockerfile", "packaging/gpumesh.service"):
        assert f"]({path})" in README, f"README links {path}"


def test_the_gateway_figures_name_their_bench() -> None:
    row = next(line for line in README.splitlines() if line.startswith("| gateway throughput"))
    assert "bench/gateway.py" in row
