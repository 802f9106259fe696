"""Where a model's requests can go: its running instances, as this node reaches them.

The table is rebuilt from the replicated state only when models, instances or nodes change
(copy-on-write state: a changed collection is a new dict), so the hot path does one dict
lookup instead of scanning every instance per request.

A local instance is called directly on loopback with its engine key; an instance on another
node through that node's gateway, with `X-Gpumesh-Instance` naming it (and a forward
signature the gateway makes per request: auth.sign_forward).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from gpumesh.backends.registry import UnknownBackend, get_backend

from ..auth import INSTANCE_HEADER, engine_key

__all__ = ["INSTANCE_HEADER", "ModelRoute", "RouteTable", "Target"]


@dataclass(slots=True)
class Target:
    model: str
    instance_id: str
    node_id: str
    base_url: str                 # http://127.0.0.1:PORT (engine) or the peer's API URL
    local: bool
    headers: dict[str, str]       # the engine key, or the instance (a peer's)
    keeps_stream_connections: bool
    # Made once here, not per request: the headers of a JSON request to it (never mutated:
    # aiohttp copies them), and its key in the in-flight gauge.
    json_headers: dict[str, str] = field(init=False)
    series: tuple[str, str] = field(init=False)

    def __post_init__(self) -> None:
        self.json_headers = {"Content-Type": "application/json", **self.headers}
        self.series = (self.model, self.instance_id)


@dataclass(slots=True)
class ModelRoute:
    name: str
    kind: str | None
    record: dict[str, Any]
    targets: list[Target] = field(default_factory=list)
    # A vlm whose engine cannot fetch image URLs: the gateway inlines them (images.py).
    inlines_images: bool = False


class RouteTable:
    def __init__(self, view: Callable[[], Any], node_id: str, node_secret: bytes) -> None:
        self._view = view
        self._node_id = node_id
        self._node_secret = node_secret
        self._basis: tuple[Any, Any, Any] = (None, None, None)
        self._routes: dict[str, ModelRoute] = {}

    def route(self, model: str) -> ModelRoute | None:
        view = self._view()
        basis = self._basis
        if (view.models is not basis[0] or view.instances is not basis[1]
                or view.nodes is not basis[2]):
            self._rebuild(view)
        return self._routes.get(model)

    def all(self) -> dict[str, ModelRoute]:
        self.route("")
        return self._routes

    def _rebuild(self, view: Any) -> None:
        routes = {name: ModelRoute(name, model.get("kind"), model,
                                   inlines_images=model.get("kind") == "vlm"
                                   and not _fetches_image_urls(model.get("backend")))
                  for name, model in view.models.items()}
        keeps = {name: _keeps_stream_connections(model.get("backend"))
                 for name, model in view.models.items()}
        for instance in sorted(view.instances.values(), key=lambda i: i["id"]):
            route = routes.get(instance["model"])
            if route is None or instance["state"] != "running" or not instance.get("port"):
                continue
            if instance["node_id"] == self._node_id:
                target = Target(route.name, instance["id"], self._node_id,
                                f"http://127.0.0.1:{instance['port']}", True,
                                {"Authorization": "Bearer "
                                 + engine_key(self._node_secret, instance["id"])},
                                keeps[route.name])
            else:
                node = view.nodes.get(instance["node_id"])
                if node is None or not node.get("api_url"):
                    continue
                # The peer's gateway (aiohttp) keeps connections, whatever its engine does.
                target = Target(route.name, instance["id"], instance["node_id"],
                                node["api_url"], False,
                                {INSTANCE_HEADER: instance["id"]}, True)
            route.targets.append(target)
        self._routes = routes
        self._basis = (view.models, view.instances, view.nodes)


def _keeps_stream_connections(backend: str | None) -> bool:
    """llama.cpp closes a connection after every streamed answer although it announced
    keep-alive: a pooled one would be stale for the next request. Other engines keep them."""
    return _backend_says(backend, "keeps_stream_connections")


def _fetches_image_urls(backend: str | None) -> bool:
    """vLLM and SGLang fetch a chat's image URLs themselves; llama.cpp cannot."""
    return _backend_says(backend, "fetches_image_urls")


def _backend_says(backend: str | None, attribute: str) -> bool:
    """A backend's flag; True for one this node does not know (a custom engine)."""
    try:
        return bool(getattr(get_backend(backend or ""), attribute, True))
    except UnknownBackend:
        return True
