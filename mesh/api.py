"""The management API under /api, on every node: models, instances, backends. The cluster's
own routes (status, nodes, joins) live in cluster_api.py, users and keys in api_access.py,
usage in api_usage.py. Who may call what is the auth middleware's business (mesh/auth.py):
admin keys everything, `/api/health` and `/api/join` no key.

Reads are served from this node's replica of the state (they may trail the leader by a
commit); writes are replicated commands, committed before the answer. Errors use the same
OpenAI-shaped body as the gateway, so one client parses both.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any, Callable

from aiohttp import web

from gpumesh import __version__

from .api_common import json_object, model_record, submit_or_error
from .errors import openai_error
from .scheduler.architectures import architecture_check
from .scheduler.demand import is_on_demand
from .deployments import DeploymentError, validate_replicas
from .replicated import StateView
from .state import ClusterStore

__all__ = ["ManagementApi", "model_summary"]

_REJECTION_STATUS = {"too_large": 413, "model_exists": 409, "model_not_found": 404,
                     "instance_not_found": 404}


class ManagementApi:
    def __init__(self, store: ClusterStore, node_id: str, started: float,
                 local_backends: Callable[[], list[dict[str, Any]]]):
        self._store = store
        self._node_id = node_id
        self._started = started
        self._local_backends = local_backends

    def add_routes(self, app: web.Application) -> None:
        r = app.router
        r.add_get("/api/health", self.health)
        r.add_get("/api/backends", self.list_backends)
        r.add_get("/api/models", self.list_models)
        r.add_post("/api/models", self.create_model)
        r.add_get("/api/models/{name:.+}", self.get_model)
        r.add_patch("/api/models/{name:.+}", self.update_model)
        r.add_delete("/api/models/{name:.+}", self.delete_model)
        r.add_get("/api/instances", self.list_instances)
        r.add_post("/api/instances/{id}/restart", self.restart_instance)

    # --- read ------------------------------------------------------------------------------

    async def health(self, request: web.Request) -> web.Response:
        # Open to all: the version lets `gpumesh version` / `doctor` compare without a key.
        return web.json_response({"status": "ok", "version": __version__})

    async def list_backends(self, request: web.Request) -> web.Response:
        return web.json_response({"data": self._local_backends()})

    async def list_models(self, request: web.Request) -> web.Response:
        view = self._store.view
        return web.json_response({"data": [model_summary(view, name)
                                           for name in sorted(view.models)]})

    async def get_model(self, request: web.Request) -> web.Response:
        view = self._store.view
        name = request.match_info["name"]
        if name not in view.models:
            return openai_error(404, f"no model named {name!r}", code="model_not_found")
        return web.json_response(model_summary(view, name))

    async def list_instances(self, request: web.Request) -> web.Response:
        instances = sorted(self._store.view.instances.values(), key=lambda i: i["id"])
        return web.json_response({"data": instances})

    # --- write -----------------------------------------------------------------------------

    async def create_model(self, request: web.Request) -> web.Response:
        record = await model_record(request, self._store)
        if isinstance(record, web.Response):
            return record
        view = self._store.view
        check = architecture_check(record, view.nodes.values(), view.engine_architectures)
        if check is not None and not check["ok"]:
            return openai_error(400, check["detail"], param="source",
                                code="unsupported_architecture")
        result = await self._submit({"op": "create_model", "model": record})
        if isinstance(result, web.Response):
            return result
        return web.json_response(model_summary(self._store.view, record["name"]), status=201)

    async def update_model(self, request: web.Request) -> web.Response:
        """Only `replicas` can change in place; anything else is a new deployment."""
        body = await json_object(request)
        if isinstance(body, web.Response):
            return body
        if set(body) != {"replicas"}:
            return openai_error(400, "only 'replicas' can be changed; delete and deploy again "
                                "to change anything else", param=",".join(sorted(body)))
        try:
            replicas = validate_replicas(body["replicas"])
        except DeploymentError as exc:
            return openai_error(400, str(exc), param=exc.param)
        name = request.match_info["name"]
        result = await self._submit({"op": "update_model", "name": name,
                                     "changes": {"replicas": replicas}})
        if isinstance(result, web.Response):
            return result
        return web.json_response(model_summary(self._store.view, name))

    async def delete_model(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        result = await self._submit({"op": "delete_model", "name": name})
        if isinstance(result, web.Response):
            return result
        return web.json_response({"deleted": name,
                                  "instances_removed": result["instances_removed"]})

    async def restart_instance(self, request: web.Request) -> web.Response:
        """Any node: the owning node's agent restarts the engine once the command applies
        there (`restart_instance` bumps the record's `restart_generation`)."""
        instance_id = request.match_info["id"]
        result = await self._submit({"op": "restart_instance", "id": instance_id,
                                     "at": time.time()})
        if isinstance(result, web.Response):
            return result
        instance = result["instance"]
        node = self._store.view.nodes.get(instance["node_id"]) or {}
        return web.json_response({"restarting": instance_id, "model": instance["model"],
                                  "node_id": instance["node_id"],
                                  "node": node.get("name", instance["node_id"]),
                                  "node_status": node.get("status"),
                                  "restart_generation": instance["restart_generation"]},
                                 status=202)

    async def _submit(self, command: dict[str, Any]) -> dict[str, Any] | web.Response:
        return await submit_or_error(self._store, command, _REJECTION_STATUS)


def model_summary(view: StateView, name: str) -> dict[str, Any]:
    """The model record plus what users ask first: is it up, and if not, why."""
    model = view.models[name]
    instances = sorted(view.instances_of(name), key=lambda i: i["id"])
    states = Counter(i["state"] for i in instances)
    return {**model, "status": _model_status(model, states), "instances": instances,
            "ready_replicas": states.get("running", 0)}


def _model_status(model: dict[str, Any], states: Counter) -> str:
    if model["replicas"] == 0:
        # Scaled to 0: stopped once its instances are gone, not while they still run.
        return "stopping" if states else "stopped"
    if states.get("running", 0) >= model["replicas"]:
        return "running"
    if model.get("schedule_error"):
        return "unschedulable"
    if states.get("error"):
        return "error"
    if not states and is_on_demand(model):
        return "idle"            # scaled to zero: the next request starts it
    return "deploying"
