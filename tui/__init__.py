"""`gpumesh tui`: the console. A Textual app that attaches to any node over HTTP.

It never imports the daemon (`gpumesh.mesh`): everything it knows comes from a node's
management API and its `/api/events` stream.
"""

from __future__ import annotations

__all__ = ["run"]


def run(url: str, api_key: str | None, *, mouse: bool = True, theme: str | None = None) -> int:
    """Run the console attached to `url` until the user quits; returns the exit status."""
    from .app import GpumeshConsole          # Textual loads only when the console starts

    app = GpumeshConsole(url, api_key, theme=theme)
    return int(app.run(mouse=mouse) or 0)
