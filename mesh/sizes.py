"""Sizes in words for people ("1.5 KiB"); exact numbers stay in the API and the state."""

from __future__ import annotations

__all__ = ["format_bytes"]


def format_bytes(count: int) -> str:
    """1536 -> '1.5 KiB'; words for people, exact numbers stay in the API."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
