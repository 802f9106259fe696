"""The shape every CLI command shares: exit codes, the common flags, and how results and
errors are printed.

Rules for every command group (`mesh/cli/<group>.py`):
- a command that talks to a node is made with `add_client_command` (it brings --url,
  --api-key and --json) and gets its client from `client_for(args)`;
- a command that only reads this machine takes `add_json_flag`;
- results go through `print_result` (JSON on stdout with --json, else text or a `table`);
- failures raise `CliError(message, Exit.X)` (or let the client's `ApiError` through):
  `main` prints `error: ...` on stderr — and with --json also `{"error": {...}}` on stdout —
  and exits with the code. Never `sys.exit` or `print(..., file=sys.stderr)` in a handler.
- colour only through `Styled`/`status_cell`: plain when stdout is not a terminal or
  `NO_COLOR` is set, so scripts and pipes never see escape codes.
"""

from __future__ import annotations

import argparse
import enum
import json
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, TextIO

from ..client import ApiClient, ApiError, resolve_target

__all__ = ["CliError", "EXIT_CODES_HELP", "Exit", "Styled", "add_client_command",
           "add_group", "add_json_flag", "completes", "client_for", "colour_enabled", "error_from_api", "gib",
           "name_values",
           "print_error", "print_result", "source_label", "status_cell", "table"]


class Exit(enum.IntEnum):
    """What a script can tell apart by the exit status alone."""

    OK = 0
    ERROR = 1              # gpumesh said no for another reason (conflict, server error)
    USAGE = 2              # bad flags/arguments, or input the node refused as invalid (400)
    NOT_FOUND = 3          # no such model, node, key … (404)
    NOT_AUTHORISED = 4     # no key, a wrong key, or a key without the right (401, 403)
    UNREACHABLE = 5        # no node answered at the URL
    TIMED_OUT = 6          # --wait ran out, or the node did not answer in time
    NOT_SCHEDULABLE = 7    # no node has room for the model (with the numbers)
    INTERRUPTED = 130      # Ctrl-C


EXIT_CODES_HELP = """\
exit codes:
  0    success
  1    error: gpumesh refused or failed for another reason (e.g. the name is taken)
  2    usage error: a bad flag or argument, or input the node refused as invalid
  3    not found: no such model, node or key
  4    not authorised: no API key, a wrong one, or one without the right
  5    unreachable: no gpumesh node answered at the URL
  6    timed out: --wait ran out of time, or the node did not answer in time
  7    not schedulable: no node has room for the model (the message has the numbers)
  130  interrupted (Ctrl-C)"""


class CliError(Exception):
    """A failure to report and exit with. `data` (optional) is printed with --json."""

    def __init__(self, message: str, exit_code: Exit = Exit.ERROR,
                 data: dict[str, Any] | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.data = data
        self.code = code


def error_from_api(exc: ApiError) -> CliError:
    """The exit code a refusal or a transport failure means."""
    if exc.status == 0:
        status = Exit.TIMED_OUT if exc.timed_out else Exit.UNREACHABLE
    elif exc.status in (401, 403):
        status = Exit.NOT_AUTHORISED
    elif exc.status == 404:
        status = Exit.NOT_FOUND
    elif exc.status in (400, 413, 422):
        status = Exit.USAGE
    elif exc.status == 504:
        status = Exit.TIMED_OUT
    elif exc.code in ("unschedulable", "not_schedulable"):
        status = Exit.NOT_SCHEDULABLE
    else:
        status = Exit.ERROR
    return CliError(str(exc), status, code=exc.code)


# --- flags -------------------------------------------------------------------------------

def add_client_command(sub: Any, name: str, handler: Callable[[argparse.Namespace], int],
                       help_: str, aliases: tuple[str, ...] = (),
                       description: str | None = None) -> argparse.ArgumentParser:
    """A subcommand that talks to a node's API: --url, --api-key and --json come with it."""
    p = sub.add_parser(name, help=help_, aliases=list(aliases), description=description or
                       _sentence(help_), epilog=EXIT_CODES_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="a node's API, e.g. 10.0.0.5:8470 or http://10.0.0.5:8470/v1 "
                   "(default: $GPUMESH_URL, else the local node found through its data dir)")
    p.add_argument("--api-key", help="admin API key (default: $GPUMESH_API_KEY, else the "
                   "local data dir's admin.key)")
    add_json_flag(p)
    p.set_defaults(command=name, handler=handler)
    return p


def add_group(sub: Any, name: str, help_: str, commands_help: str,
              description: str | None = None) -> Any:
    """A command that only groups others (`gpumesh keys create|ls|revoke`). Alone it prints
    its help on stderr and exits 2, as bare `gpumesh` does. Returns its subparsers."""
    group = sub.add_parser(name, help=help_, description=description or _sentence(help_))

    def show_help(args: argparse.Namespace) -> int:
        group.print_help(sys.stderr)
        return Exit.USAGE

    group.set_defaults(command=name, handler=show_help)
    return group.add_subparsers(title="commands", metavar="COMMAND", help=commands_help)


def completes(action: argparse.Action, kind: str) -> argparse.Action:
    """Mark a positional as naming a `kind` ("models", "nodes", "instances"): shell
    completion then offers the live names (completion.py)."""
    action.complete = kind           # type: ignore[attr-defined]
    return action


def add_json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true",
                        help="print JSON on stdout for scripts (errors too, as {\"error\": …})")


def name_values(parser: argparse.ArgumentParser) -> None:
    """`--drain-seconds SECONDS`, not `--drain-seconds DRAIN_S`: a value's metavar says its
    unit where the dest's suffix does, for every flag without a metavar of its own."""
    units = (("_s", "SECONDS"), ("_mib", "MIB"), ("_port", "PORT"), ("_dir", "DIR"),
             ("host", "ADDRESS"))
    for action in parser._actions:                                   # noqa: SLF001
        if not action.option_strings or action.metavar or action.choices or action.nargs == 0:
            continue
        action.metavar = next((unit for suffix, unit in units if action.dest.endswith(suffix)),
                              None)


def client_for(args: argparse.Namespace, timeout: float = 30.0) -> ApiClient:
    try:
        target = resolve_target(args.url, args.api_key)
    except ValueError as exc:
        raise CliError(str(exc), Exit.USAGE) from None
    return ApiClient(target=target, timeout=timeout)


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:] + ("" if text.endswith(".") else ".")


# --- printing ----------------------------------------------------------------------------

def print_result(args: argparse.Namespace, data: Any, human: Callable[[Any], str]) -> None:
    """JSON with --json, else the text `human(data)` makes."""
    if getattr(args, "json", False):
        print(json.dumps(data, indent=2))
    else:
        text = human(data)
        if text:
            print(text)


def print_error(args: argparse.Namespace | None, error: CliError) -> None:
    """`error: …` on stderr; with --json also one JSON document on stdout, so a script that
    reads stdout always gets JSON (the error's message, code and exit status)."""
    if args is not None and getattr(args, "json", False):
        body: dict[str, Any] = {"error": {"message": str(error), "code": error.code,
                                          "exit_code": int(error.exit_code)}}
        if error.data is not None:
            body.update({k: v for k, v in error.data.items() if k != "error"})
        print(json.dumps(body, indent=2))
    label = Styled("error:", "red").render(colour_enabled(sys.stderr))
    print(f"{label} {error}", file=sys.stderr)


def colour_enabled(stream: TextIO | None = None) -> bool:
    """Colour only for a person at a terminal: never in pipes, with NO_COLOR (any value,
    https://no-color.org) or TERM=dumb; FORCE_COLOR forces it (for screenshots)."""
    if os.environ.get("NO_COLOR"):
        return False
    if os.environ.get("FORCE_COLOR"):
        return True
    stream = stream or sys.stdout
    return bool(getattr(stream, "isatty", lambda: False)()) and os.environ.get("TERM") != "dumb"


_SGR = {"red": "31", "green": "32", "yellow": "33", "blue": "34", "dim": "2", "bold": "1"}


@dataclass(frozen=True)
class Styled:
    """A table cell or word with a colour that is applied only when colour is enabled."""

    text: str
    style: str | None = None

    def __str__(self) -> str:
        return self.text

    def render(self, colour: bool) -> str:
        if not colour or not self.style:
            return self.text
        return f"\x1b[{_SGR[self.style]}m{self.text}\x1b[0m"


# Words that mean "fine", "on the way" and "needs you", across the groups' status columns.
_STATUS_STYLES = {
    **dict.fromkeys(("running", "ready", "ok", "yes", "healthy", "leader", "active"), "green"),
    **dict.fromkeys(("deploying", "scheduled", "starting", "downloading", "pending", "warn",
                     "draining", "joining"), "yellow"),
    **dict.fromkeys(("error", "unschedulable", "unreachable", "fail", "no", "down", "failed"),
                    "red"),
    **dict.fromkeys(("stopped", "stopping", "removed", "skip"), "dim"),
}


def status_cell(value: Any) -> Styled:
    text = str(value)
    return Styled(text, _STATUS_STYLES.get(text.split(":")[0].strip().lower()))


def table(headers: list[str], rows: list[list[Any]], colour: bool | None = None) -> str:
    """Aligned columns for people. Cells may be `Styled`; widths count the text only."""
    colour = colour_enabled() if colour is None else colour
    cells = [[Styled(h, "bold") for h in headers]] + [
        [c if isinstance(c, Styled) else Styled(str(c)) for c in row] for row in rows]
    widths = [max(len(r[i].text) for r in cells) for i in range(len(headers))]
    lines = []
    for row in cells:
        parts = [c.render(colour) + " " * (w - len(c.text)) for c, w in zip(row, widths)]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def gib(count: int) -> str:
    return f"{count / (1 << 30):.2f} GiB"


def source_label(source: dict[str, Any]) -> str:
    if source["kind"] == "local":
        return source["path"]
    suffix = f":{source['file']}" if source.get("file") else ""
    return f"hf://{source['repo']}{suffix}"
