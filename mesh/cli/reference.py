"""README's CLI reference, made from the parser itself so that it cannot drift from
`gpumesh --help`: `python -m gpumesh.mesh.cli.reference` prints it, `--write README.md`
replaces the block between the two markers, and a test fails when README's block differs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["BEGIN", "END", "cli_reference", "list_commands", "replace_block"]

BEGIN = "<!-- cli-reference: made by `python -m gpumesh.mesh.cli.reference --write README.md` -->"
END = "<!-- /cli-reference -->"

# Flags every command that talks to a node has; said once above the table, not per row.
_NODE_FLAGS = ("--url", "--api-key")


def cli_reference(parser: argparse.ArgumentParser | None = None) -> str:
    """A Markdown table: one row per command (`gpumesh keys create`), what it does, its flags."""
    if parser is None:
        from . import build_parser
        parser = build_parser()
    rows = ["| command | what it does | flags |", "| --- | --- | --- |"]
    for path, help_, sub in list_commands(parser, []):
        usage = " ".join(["gpumesh", *path, *_positionals(sub)])
        flags = " ".join(f"`{flag}`" for flag in _flags(sub))
        rows.append(f"| `{usage}` | {_cell(help_)} | {flags} |")
    return "\n".join([
        "Every command that talks to a node also takes `--url` and `--api-key` (defaults: "
        "`$GPUMESH_URL`, `$GPUMESH_API_KEY`, else the local node's data dir); every read "
        "takes `--json`. Exit codes (`gpumesh --help`): 0 success, 1 error, 2 usage, "
        "3 not found, 4 not authorised, 5 unreachable, 6 timed out, 7 not schedulable, "
        "130 interrupted.", "", *rows])


def replace_block(text: str, block: str) -> str:
    """`text` with what lies between BEGIN and END replaced by `block`."""
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    return text[:start] + "\n" + block + "\n" + text[end:]


def list_commands(parser: argparse.ArgumentParser, path: list[str]
              ) -> list[tuple[list[str], str, argparse.ArgumentParser]]:
    """Every command in `--help` order, a group (`keys`) before its own commands; a group
    that does nothing alone (it prints its help and exits 2) has no row of its own."""
    found = []
    for action in parser._actions:                                   # noqa: SLF001
        if not isinstance(action, argparse._SubParsersAction):        # noqa: SLF001
            continue
        for choice in action._choices_actions:                        # noqa: SLF001
            sub = action.choices[choice.dest]
            if not _only_groups(sub):
                found.append((path + [choice.dest], choice.help or "", sub))
            found.extend(list_commands(sub, path + [choice.dest]))
    return found


def _only_groups(parser: argparse.ArgumentParser) -> bool:
    has_subcommands = any(isinstance(a, argparse._SubParsersAction)  # noqa: SLF001
                          for a in parser._actions)                   # noqa: SLF001
    return has_subcommands and not _flags(parser)


def _positionals(parser: argparse.ArgumentParser) -> list[str]:
    words = []
    for action in parser._actions:                                   # noqa: SLF001
        if action.option_strings or isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
            continue
        name = action.metavar if isinstance(action.metavar, str) else action.dest.upper()
        words.append(f"[{name}]" if action.nargs in ("?", "*") else name)
    return words


def _flags(parser: argparse.ArgumentParser) -> list[str]:
    flags = []
    for action in parser._actions:                                   # noqa: SLF001
        if not action.option_strings or isinstance(action, argparse._HelpAction):  # noqa: SLF001
            continue
        longest = max(action.option_strings, key=len)
        if longest not in _NODE_FLAGS:
            flags.append(longest)
    return flags


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def main(argv: list[str]) -> int:
    block = cli_reference()
    if argv[:1] == ["--write"] and len(argv) == 2:
        readme = Path(argv[1])
        readme.write_text(replace_block(readme.read_text(encoding="utf-8"), block),
                          encoding="utf-8")
    elif argv:
        print("usage: python -m gpumesh.mesh.cli.reference [--write README.md]", file=sys.stderr)
        return 2
    else:
        print(block)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
