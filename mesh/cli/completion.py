"""`gpumesh completion bash|zsh|fish`: shell completion scripts made from the parser itself.

The argparse tree (commands, nested groups, options, which options take a value, choices)
is read once and written out as data for a small static script per shell, so a new
command or flag completes without touching this module. Positionals that name things in
the cluster complete live: an argparse action with `complete="models"` (see `names`) is
completed by `gpumesh __complete models`, which asks the local node with a short timeout
and prints nothing when it cannot (completion must never hang or print errors).

Install: bash `source <(gpumesh completion bash)` (or write it to
~/.local/share/bash-completion/completions/gpumesh); zsh `gpumesh completion zsh >
"${fpath[1]}/_gpumesh"`; fish `gpumesh completion fish > ~/.config/fish/completions/gpumesh.fish`.
"""

from __future__ import annotations

import argparse
import shlex
from dataclasses import dataclass, field
from typing import Any

from .output import Exit

__all__ = ["SHELLS", "complete_names", "command_tree", "register", "script"]

SHELLS = ("bash", "zsh", "fish")
# What `__complete KIND` can list, and the API path it reads.
NAMEABLE = {"models": "/api/models", "nodes": "/api/nodes", "instances": "/api/instances"}


@dataclass
class Option:
    flags: list[str]
    help: str
    takes_value: bool
    choices: list[str] | None


@dataclass
class Command:
    path: list[str]                                   # e.g. ["node", "drain"]
    help: str
    options: list[Option] = field(default_factory=list)
    commands: dict[str, "Command"] = field(default_factory=dict)   # aliases included
    positionals: list[str | None] = field(default_factory=list)   # what each completes


def command_tree(parser: argparse.ArgumentParser, path: list[str] | None = None,
                 help_: str = "") -> Command:
    node = Command(path or [], help_)
    for action in parser._actions:                                    # noqa: SLF001
        if isinstance(action, argparse._SubParsersAction):            # noqa: SLF001
            helps = {a.dest: a.help or "" for a in action._choices_actions}  # noqa: SLF001
            for name, sub in action.choices.items():
                canonical = next((n for n, p in action.choices.items() if p is sub), name)
                node.commands[name] = command_tree(sub, node.path + [canonical],
                                                   helps.get(name, helps.get(canonical, "")))
        elif action.option_strings:
            if action.help == argparse.SUPPRESS:
                continue
            node.options.append(Option(list(action.option_strings), _one_line(action.help),
                                       action.nargs != 0, _choices(action)))
        else:
            node.positionals.append(getattr(action, "complete", None) or
                                    ("choices" if action.choices else None))
    return node


def _choices(action: argparse.Action) -> list[str] | None:
    return [str(c) for c in action.choices] if action.choices else None


def _one_line(text: str | None) -> str:
    return " ".join((text or "").split()).replace("%%", "%")


def _walk(node: Command) -> list[Command]:
    seen, out = set(), []
    for child in [node, *[c for sub in node.commands.values() for c in _walk(sub)]]:
        key = " ".join(child.path)
        if key not in seen:
            seen.add(key)
            out.append(child)
    return out


# --- bash --------------------------------------------------------------------------------

def _bash(root: Command) -> str:
    lines = ["# bash completion for gpumesh (made by `gpumesh completion bash`)",
             "declare -gA _gpumesh_cmds=() _gpumesh_opts=() _gpumesh_valued=() "
             "_gpumesh_choices=() _gpumesh_pos=()"]
    for node in _walk(root):
        key = shlex.quote(" ".join(["gpumesh", *node.path]))
        lines.append(f"_gpumesh_cmds[{key}]={shlex.quote(' '.join(node.commands))}")
        lines.append(f"_gpumesh_opts[{key}]="
                     f"{shlex.quote(' '.join(f for o in node.options for f in o.flags))}")
        lines.append(f"_gpumesh_valued[{key}]=" + shlex.quote(
            " " + " ".join(f for o in node.options if o.takes_value for f in o.flags) + " "))
        lines.append(f"_gpumesh_pos[{key}]="
                     f"{shlex.quote(' '.join(p or '-' for p in node.positionals))}")
        for option in node.options:
            if option.choices:
                for flag in option.flags:
                    lines.append(f"_gpumesh_choices[{shlex.quote(' '.join(['gpumesh', *node.path, flag]))}]="
                                 f"{shlex.quote(' '.join(option.choices))}")
    lines.append(_BASH_FUNCTION)
    return "\n".join(lines) + "\n"


_BASH_FUNCTION = r'''
_gpumesh() {
    local cur=${COMP_WORDS[COMP_CWORD]} prev=${COMP_WORDS[COMP_CWORD-1]}
    local path=gpumesh word i npos=0 skip=0
    for ((i = 1; i < COMP_CWORD; i++)); do
        word=${COMP_WORDS[i]}
        if ((skip)); then skip=0; continue; fi
        if [[ $word == -* ]]; then
            [[ $word != *=* && ${_gpumesh_valued[$path]} == *" $word "* ]] && skip=1
            continue
        fi
        local next="$path $word"
        if [[ " ${_gpumesh_cmds[$path]} " == *" $word "* && -n ${_gpumesh_opts[$next]+x} ]]; then
            path=$next; npos=0
        else
            ((npos++))
        fi
    done
    if [[ $prev == -* && ${_gpumesh_valued[$path]} == *" $prev "* ]]; then
        local choices=${_gpumesh_choices["$path $prev"]}
        if [[ -n $choices ]]; then COMPREPLY=($(compgen -W "$choices" -- "$cur")); fi
        return 0                                   # else: files, through -o default
    fi
    if [[ $cur == -* ]]; then
        COMPREPLY=($(compgen -W "${_gpumesh_opts[$path]}" -- "$cur"))
        return 0
    fi
    if [[ -n ${_gpumesh_cmds[$path]} ]]; then
        COMPREPLY=($(compgen -W "${_gpumesh_cmds[$path]}" -- "$cur"))
        return 0
    fi
    local kinds=(${_gpumesh_pos[$path]}) kind
    kind=${kinds[$npos]:-}
    case $kind in
        models|nodes|instances)
            COMPREPLY=($(compgen -W "$(gpumesh __complete "$kind" 2>/dev/null)" -- "$cur"));;
    esac
    return 0
}
complete -o default -F _gpumesh gpumesh
'''


# --- zsh ---------------------------------------------------------------------------------

def _zsh_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("'", "'\\''").replace("[", "\\[") \
        .replace("]", "\\]").replace(":", "\\:")


def _zsh_function_name(node: Command) -> str:
    return "_gpumesh" + "".join("_" + p.replace("-", "_") for p in node.path)


def _zsh(root: Command) -> str:
    out = ["#compdef gpumesh", "# zsh completion for gpumesh (made by `gpumesh completion zsh`)",
           ""]
    for node in _walk(root):
        out.append(f"{_zsh_function_name(node)}() {{")
        specs = []
        for option in node.options:
            help_ = _zsh_escape(option.help)
            value = ""
            if option.takes_value:
                value = (f":value:({' '.join(option.choices)})" if option.choices
                         else ":value:_files")
            exclusive = f"({' '.join(option.flags)})" if len(option.flags) > 1 else ""
            for flag in option.flags:
                specs.append(f"'{exclusive}{flag}[{help_}]{value}'")
        if node.commands:
            specs += ["'1: :->command'", "'*:: :->argument'"]
        else:
            for index, kind in enumerate(node.positionals, 1):
                action = (f"_gpumesh_names {kind}" if kind in NAMEABLE else "_files")
                specs.append(f"'{index}: :{action}'")
        out.append("    local context state state_descr line")
        out.append("    typeset -A opt_args")
        out.append("    _arguments -s -S \\\n        " + " \\\n        ".join(specs or ["'*: :_files'"]))
        if node.commands:
            listed = {}
            for name, sub in node.commands.items():
                listed[name] = sub.help
            described = " ".join(f"'{_zsh_escape(n)}:{_zsh_escape(h)}'" for n, h in listed.items())
            cases = " ".join(f"{n}) {_zsh_function_name(s)} ;;" for n, s in node.commands.items())
            out += ["    case $state in",
                    f"        command) local -a commands=({described}); "
                    "_describe -t commands 'gpumesh command' commands ;;",
                    f"        argument) case $line[1] in {cases} esac ;;",
                    "    esac"]
        out += ["}", ""]
    out += ["_gpumesh_names() {",
            "    local -a names=(${(f)\"$(gpumesh __complete $1 2>/dev/null)\"})",
            "    _describe -t names $1 names",
            "}", "", 'if [[ $zsh_eval_context[-1] == loadautofunc ]]; then _gpumesh "$@"; '
            "else compdef _gpumesh gpumesh; fi"]
    return "\n".join(out) + "\n"


# --- fish --------------------------------------------------------------------------------

def _fish_escape(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _fish(root: Command) -> str:
    out = ["# fish completion for gpumesh (made by `gpumesh completion fish`)",
           "complete -c gpumesh -f"]
    for node in _walk(root):
        condition = _fish_condition(root, node)
        for name, sub in node.commands.items():
            out.append(f"complete -c gpumesh -n {_fish_escape(condition)} -a {name} "
                       f"-d {_fish_escape(sub.help)}")
        for option in node.options:
            parts = []
            for flag in option.flags:
                parts.append(f"-l {flag[2:]}" if flag.startswith("--") else f"-s {flag[1:]}")
            value = ""
            if option.takes_value:
                value = f" -x -a {_fish_escape(' '.join(option.choices))}" if option.choices \
                    else " -r -F"
            out.append(f"complete -c gpumesh -n {_fish_escape(condition)} {' '.join(parts)}"
                       f"{value} -d {_fish_escape(option.help)}")
        kinds = {k for k in node.positionals if k in NAMEABLE}
        for kind in sorted(kinds):
            out.append(f"complete -c gpumesh -n {_fish_escape(condition)} "
                       f"-a '(gpumesh __complete {kind} 2>/dev/null)'")
        if not node.commands and None in node.positionals:
            out.append(f"complete -c gpumesh -n {_fish_escape(condition)} -F")
    return "\n".join(out) + "\n"


def _fish_condition(root: Command, node: Command) -> str:
    if not node.path:
        return "__fish_use_subcommand"
    parts = [f"__fish_seen_subcommand_from {' '.join(_names_of(root, node.path[:i + 1]))}"
             for i in range(len(node.path))]
    if node.commands:
        parts.append(f"not __fish_seen_subcommand_from {' '.join(node.commands)}")
    return "; and ".join(parts)


def _names_of(root: Command, path: list[str]) -> list[str]:
    """The names (aliases too) that reach the command at `path`."""
    parent = root
    for step in path[:-1]:
        parent = parent.commands[step]
    target = parent.commands[path[-1]]
    return [name for name, sub in parent.commands.items() if sub is target]


# --- commands ----------------------------------------------------------------------------

def script(parser: argparse.ArgumentParser, shell: str) -> str:
    root = command_tree(parser)
    return {"bash": _bash, "zsh": _zsh, "fish": _fish}[shell](root)


def complete_names(kind: str) -> list[str]:
    """Names for live completion; nothing (never an error) when the node cannot say."""
    from ..client import ApiClient, ApiError
    if kind not in NAMEABLE:
        return []
    try:
        data = ApiClient(timeout=1.5).get(NAMEABLE[kind])
    except (ApiError, ValueError, OSError):
        return []
    items = data.get("data", []) if isinstance(data, dict) else []
    return sorted({str(i.get("name") if kind != "instances" else i.get("id")) for i in items
                   if isinstance(i, dict)})


def cmd_completion(args: argparse.Namespace) -> int:
    from . import build_parser
    print(script(build_parser(), args.shell), end="")
    return Exit.OK


def register(sub: Any) -> None:
    completion = sub.add_parser(
        "completion", help="print a shell completion script (bash, zsh or fish)",
        description="Print a completion script for SHELL. bash: `source <(gpumesh completion "
                    "bash)` in ~/.bashrc; zsh: `gpumesh completion zsh > "
                    "\"${fpath[1]}/_gpumesh\"`; fish: `gpumesh completion fish > "
                    "~/.config/fish/completions/gpumesh.fish`.")
    completion.add_argument("shell", metavar="SHELL", choices=SHELLS,
                            help="bash, zsh or fish")
    completion.set_defaults(command="completion", handler=cmd_completion)
