"""Commands on the `models` collection: deployments and their desired replica counts."""

from __future__ import annotations

from typing import Any

from .common import CommandError, Result, State, refuse_identity_changes


def _create_model(state: State, cmd: dict[str, Any]) -> tuple[dict, Result]:
    model = dict(cmd["model"])
    if model["name"] in state["models"]:
        raise CommandError("model_exists", f"a model named {model['name']!r} already exists")
    models = dict(state["models"])
    models[model["name"]] = model
    return {"models": models}, {"ok": True, "model": model}



def _update_model(state: State, cmd: dict[str, Any]) -> tuple[dict, Result]:
    name = cmd["name"]
    if name not in state["models"]:
        raise CommandError("model_not_found", f"no model named {name!r}")
    refuse_identity_changes(cmd["changes"], ("name",))
    models = dict(state["models"])
    models[name] = {**models[name], **cmd["changes"]}
    return {"models": models}, {"ok": True, "model": models[name]}



def _delete_model(state: State, cmd: dict[str, Any]) -> tuple[dict, Result]:
    name = cmd["name"]
    if name not in state["models"]:
        raise CommandError("model_not_found", f"no model named {name!r}")
    models = {k: v for k, v in state["models"].items() if k != name}
    instances = {k: v for k, v in state["instances"].items() if v["model"] != name}
    removed = len(state["instances"]) - len(instances)
    return {"models": models, "instances": instances}, {"ok": True, "instances_removed": removed}



HANDLERS = {
    "create_model": _create_model,
    "update_model": _update_model,
    "delete_model": _delete_model,
}
