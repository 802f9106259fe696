"""`gpumesh deploy -f SPEC.yaml`: models described in a file, applied idempotently.

A spec file is one model (a mapping with `source`), a list of them under `models:`, or
several YAML documents separated by `---`. Fields: `source` (required), `name`,
`replicas`, `backend` (NAME or NAME==VERSION), `context_length`, `args`, `kind`, `image`,
and for the scheduler `placement`, `min_replicas`, `idle_timeout_s` (mesh/scheduler/spec.py).
Relative paths are relative to the file, not the shell.

Applying is declarative and idempotent: a model that does not exist is created; one that
exists with the same fields is left alone; one that differs only in `replicas` is scaled
in place; one whose source, backend, context or engine args differ is refused (that needs
new engines) unless `--replace` is given, which removes and deploys it again. Models
missing from the file are left alone. Every error names the file and line.

The plan (what would change) is made for every model before anything is applied, so a
typo in the third model does not leave the first two half-applied.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..client import ApiClient, ApiError, model_path
from ..deployments import default_name
from ..sources import SourceError, parse_source
from .models import absolute_if_local, describe_ready, wait_running
from .output import CliError, Exit, client_for, error_from_api, print_result

__all__ = ["apply_spec_file", "load_spec"]

FIELDS = ("name", "source", "replicas", "backend", "context_length", "args", "kind", "image",
          "placement", "min_replicas", "idle_timeout_s")
_IN_PLACE = ("replicas",)


class _Located(dict):
    """A mapping from the file that remembers its line and each key's line."""

    line: int = 0
    lines: dict[str, int]


class _Loader(yaml.SafeLoader):
    pass


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> _Located:
    loader.flatten_mapping(node)
    mapping = _Located()
    mapping.line = node.start_mark.line + 1
    mapping.lines = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        if key in mapping:
            raise SpecError(line, f"{key!r} appears twice (first on line {mapping.lines[key]})")
        mapping[key] = loader.construct_object(value_node, deep=True)
        mapping.lines[key] = line
    return mapping


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


class SpecError(Exception):
    """A problem with the file at `line`: a usage error unless it is a conflict with what
    the cluster holds."""

    def __init__(self, line: int | None, message: str, exit_code: Exit = Exit.USAGE) -> None:
        super().__init__(message)
        self.line = line
        self.exit_code = exit_code


@dataclass
class ModelSpec:
    """One model as the file asks for it, with the line of each field."""

    fields: dict[str, Any]
    line: int
    lines: dict[str, int]

    def line_of(self, param: str | None) -> int:
        return self.lines.get(param or "", self.line)

    @property
    def name(self) -> str:
        return self.fields["name"]


@dataclass
class Step:
    spec: ModelSpec
    action: str                          # create, unchanged, scale, replace
    changes: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] | None = None


# --- reading -----------------------------------------------------------------------------

def load_spec(text: str, base: Path) -> list[ModelSpec]:
    """Parse and check the file's shape (not the values: the node checks those)."""
    try:
        documents = [d for d in yaml.load_all(text, Loader=_Loader) if d is not None]
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else None
        raise SpecError(line, f"not valid YAML: {exc.problem or exc.context}") from None
    raw: list[Any] = []
    for doc in documents:
        if isinstance(doc, dict) and "models" in doc and "source" not in doc:
            extra = sorted(set(doc) - {"models"})
            if extra:
                raise SpecError(doc.lines[extra[0]], f"unknown top-level field {extra[0]!r} "
                                "(a file with `models:` holds only that list)")
            if not isinstance(doc["models"], list):
                raise SpecError(doc.lines["models"], "`models` must be a list of models")
            raw.extend(doc["models"])
        else:
            raw.append(doc)
    if not raw:
        raise SpecError(None, "the file describes no model (give `source:`, or `models:` "
                              "with a list)")
    specs = [_model_spec(item, base) for item in raw]
    seen: dict[str, int] = {}
    for spec in specs:
        if spec.name in seen:
            raise SpecError(spec.line_of("name"), f"model {spec.name!r} is also described on "
                                                  f"line {seen[spec.name]}")
        seen[spec.name] = spec.line_of("name")
    return specs


def _model_spec(item: Any, base: Path) -> ModelSpec:
    if not isinstance(item, _Located):
        raise SpecError(None, f"each model must be a mapping with `source:`, not "
                              f"{type(item).__name__} {item!r}")
    for key in item:
        if key not in FIELDS:
            close = difflib.get_close_matches(str(key), FIELDS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else \
                f" (fields: {', '.join(FIELDS)})"
            raise SpecError(item.lines[key], f"unknown field {key!r}{hint}")
    if "source" not in item:
        raise SpecError(item.line, "this model has no `source:` (a path or owner/name repo)")
    fields = dict(item)
    if isinstance(fields["source"], str):
        fields["source"] = absolute_if_local(fields["source"], base)
    if fields.get("name") is None:
        try:
            fields["name"] = default_name(parse_source(str(fields["source"])))
        except SourceError as exc:
            raise SpecError(item.lines["source"], str(exc)) from None
    return ModelSpec(fields, item.line, dict(item.lines))


# --- planning and applying ---------------------------------------------------------------

def plan(client: ApiClient, specs: list[ModelSpec]) -> list[Step]:
    steps = []
    for spec in specs:
        try:
            current = client.get(model_path(str(spec.name)))
        except ApiError as exc:
            if exc.status != 404:
                raise
            steps.append(Step(spec, "create"))
            continue
        changes = _differences(spec, current)
        if not changes:
            steps.append(Step(spec, "unchanged", model=current))
        elif set(changes) <= set(_IN_PLACE):
            steps.append(Step(spec, "scale", changes, current))
        else:
            steps.append(Step(spec, "replace", changes, current))
    return steps


def _differences(spec: ModelSpec, current: dict[str, Any]) -> dict[str, Any]:
    """Field → (now, wanted) for what the file asks differently from the stored model."""
    wanted = spec.fields
    changes: dict[str, Any] = {}
    try:
        source = parse_source(str(wanted["source"]))
    except SourceError as exc:
        raise SpecError(spec.line_of("source"), str(exc)) from None
    if _source_key(source) != _source_key(current["source"]):
        changes["source"] = (_source_key(current["source"]), _source_key(source))
    pairs = {"replicas": (current["replicas"], wanted.get("replicas", 1)),
             "context_length": (current.get("context_length"), wanted.get("context_length")),
             "args": (current.get("args") or [], wanted.get("args") or [])}
    if wanted.get("backend") is not None:
        stored = current["backend"] + (f"=={current['backend_version']}"
                                       if current.get("backend_version") else "")
        asked = str(wanted["backend"])
        if "==" not in asked:
            stored = current["backend"]            # no version asked: any version matches
        pairs["backend"] = (stored.lower(), asked.replace(" ", "").lower())
    for field in ("kind", "image"):
        if wanted.get(field) is not None:
            pairs[field] = (current.get(field), wanted[field])
    pairs["placement"] = (current.get("placement") or {}, wanted.get("placement") or {})
    pairs["min_replicas"] = (current.get("min_replicas"), wanted.get("min_replicas"))
    if wanted.get("idle_timeout_s") is not None:
        pairs["idle_timeout_s"] = (current.get("idle_timeout_s"), float(wanted["idle_timeout_s"]))
    changes.update({k: v for k, v in pairs.items() if v[0] != v[1]})
    return changes


def _source_key(source: dict[str, Any]) -> str:
    if source["kind"] == "local":
        return source["path"]
    return f"hf://{source['repo']}" + (f":{source['file']}" if source.get("file") else "") + \
        (f"@{source['revision']}" if source.get("revision", "main") != "main" else "")


def _apply(client: ApiClient, step: Step, replace: bool) -> None:
    name = step.spec.name
    body = {k: v for k, v in step.spec.fields.items() if v is not None}
    if step.action == "create":
        step.model = client.post("/api/models", body)
    elif step.action == "scale":
        step.model = client.patch(model_path(name), {"replicas": body.get("replicas", 1)})
    elif step.action == "replace":
        if not replace:
            what = ", ".join(f"{k} {now!r} → {want!r}" for k, (now, want) in step.changes.items())
            restart = [k for k in step.changes if k not in _IN_PLACE]
            raise SpecError(step.spec.line_of(restart[0]),
                            f"model {name!r} exists with other settings ({what}); changing "
                            f"them restarts its engines: pass --replace, or `gpumesh rm "
                            f"{name}` first", Exit.ERROR)
        client.delete(model_path(name))
        step.model = client.post("/api/models", body)


def apply_spec_file(args: argparse.Namespace) -> int:
    path, text, base = _read(args.file)
    client = client_for(args)
    try:
        specs = load_spec(text, base)
        steps = plan(client, specs)
        if getattr(args, "dry_run", False):
            return _dry_run(args, client, steps, path)
        if not args.replace:                          # refuse before changing anything
            for step in steps:
                if step.action == "replace":
                    _apply(client, step, replace=False)
        for step in steps:
            try:
                _apply(client, step, args.replace)
            except ApiError as exc:
                error = error_from_api(exc)
                line = step.spec.line_of(exc.param)
                done = [_describe(s, False) for s in steps[:steps.index(step)]]
                if done and not args.json:
                    print("\n".join(done))
                raise CliError(f"{path}:{line}: {step.spec.name}: {exc}", error.exit_code,
                               code=exc.code, data={"applied": _report(steps)}) from None
    except SpecError as exc:
        where = f"{path}:{exc.line}" if exc.line else path
        raise CliError(f"{where}: {exc}", exc.exit_code, code="invalid_spec") from None
    if args.wait:
        for step in steps:
            step.model = wait_running(client, step.spec.name, args.timeout)
    print_result(args, _report(steps), lambda r: "\n".join(
        _describe(step, args.wait) for step in steps))
    return Exit.OK


def _dry_run(args: argparse.Namespace, client: ApiClient, steps: list[Step], path: str) -> int:
    """What applying would do, and whether what it adds fits (`POST /api/models/evaluate`):
    a new model all its replicas, a scale-up only the added ones. Nothing is stored. Exit 7
    if something would not fit, 1 if a change would need --replace."""
    verdicts: list[dict[str, Any]] = []
    for step in steps:
        body = {k: v for k, v in step.spec.fields.items() if v is not None}
        verdict: dict[str, Any] = {"name": step.spec.name, "action": step.action,
                                   "line": step.spec.line, "fits": True, "summary": "",
                                   "changes": {k: {"from": a, "to": b}
                                               for k, (a, b) in step.changes.items()}}
        if step.action == "scale":
            now, want = step.changes["replicas"]
            body["replicas"] = max(0, want - now)
        if step.action == "replace" and not args.replace:
            verdict.update(fits=None, summary="needs --replace (its source, engine or "
                                              "settings change)")
        elif step.action != "unchanged" and body.get("replicas", 1) > 0:
            try:
                answer = client.post("/api/models/evaluate", body)
            except ApiError as exc:
                error = error_from_api(exc)
                raise CliError(f"{path}:{step.spec.line_of(exc.param)}: {step.spec.name}: "
                               f"{exc}", error.exit_code, code=exc.code) from None
            verdict.update(fits=bool(answer["fits"]), summary=answer["summary"],
                           evaluation=answer)
            if step.action == "replace":
                verdict["summary"] += " (its current instances still counted as in use)"
        verdicts.append(verdict)
    print_result(args, verdicts, lambda vs: "\n".join(map(_verdict_line, vs)))
    if any(v["fits"] is False for v in verdicts):
        return Exit.NOT_SCHEDULABLE
    return Exit.ERROR if any(v["fits"] is None for v in verdicts) else Exit.OK


def _verdict_line(v: dict[str, Any]) -> str:
    line = f"{v['name']}: would {_WOULD[v['action']]}"
    if v["fits"] is None:
        return f"{line} — {v['summary']}"
    if v["summary"]:
        return f"{line} — {'fits' if v['fits'] else 'does NOT fit'}: {v['summary']}"
    return line


_WOULD = {"create": "be created", "scale": "be scaled", "replace": "be replaced",
          "unchanged": "stay unchanged"}


def _read(file: str) -> tuple[str, str, Path]:
    if file == "-":
        return "<stdin>", sys.stdin.read(), Path.cwd()
    path = Path(file).expanduser()
    try:
        return file, path.read_text(), path.resolve().parent
    except OSError as exc:
        raise CliError(f"cannot read {file}: {exc.strerror}", Exit.USAGE) from None


def _report(steps: list[Step]) -> list[dict[str, Any]]:
    return [{"name": s.spec.name, "action": s.action, "line": s.spec.line,
             "changes": {k: {"from": a, "to": b} for k, (a, b) in s.changes.items()},
             "model": s.model} for s in steps]


def _describe(step: Step, waited: bool) -> str:
    name = step.spec.name
    if waited and step.model is not None:
        return f"{step.action}: {describe_ready(step.model)}"
    if step.action == "scale":
        now, want = step.changes["replicas"]
        return f"{name}: scaled {now} → {want} replica(s)"
    if step.action == "unchanged":
        return f"{name}: unchanged"
    verb = "created" if step.action == "create" else "replaced"
    model = step.model or {}
    return f"{name}: {verb} ({model.get('backend')}, {model.get('replicas')} replica(s))"
