"""The OpenAI-compatible gateway under /v1 (see core.py for the request's path through it).

- `core.py`: `Gateway`, the handlers, forwarding, settling (limits, meter, metrics).
- `endpoints.py`: the routes relayed and how each finds its model (JSON or multipart).
- `routing.py`: where a model's requests can go, rebuilt only when the state changes.
- `relay.py`: relaying one answer (usage read on the way), the stream watchdog.
- `failover.py`: continuing a broken stream on another replica.
- `images.py`: fetching a chat's image URLs for engines that cannot (llama.cpp), bounded.
"""

from .core import Gateway, GatewaySettings
from .endpoints import ENDPOINTS
from .routing import INSTANCE_HEADER, RouteTable

__all__ = ["ENDPOINTS", "INSTANCE_HEADER", "Gateway", "GatewaySettings", "RouteTable"]
