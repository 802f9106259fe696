"""Short, plain-text cell values: the tables re-render every visible cell on any update, so
cells stay single-line `str`s (CONSOLE-NOTES §2), and state is always in words, never only in
colour (a 16-colour or monochrome terminal must read the same)."""

from __future__ import annotations

from typing import Any

__all__ = ["ago", "bar", "gib", "needs", "num", "percent", "size", "source_label", "span"]


def gib(count: Any) -> str:
    if count is None:
        return "-"
    return f"{count / (1 << 30):.1f}G"


def size(count: Any) -> str:
    """Bytes for people: MiB below a GiB, GiB above."""
    if count is None:
        return "-"
    if count < 1 << 30:
        return f"{count / (1 << 20):.1f} MiB"
    return f"{count / (1 << 30):.2f} GiB"


def needs(estimate: Any) -> str:
    """What a model's memory estimate says it needs, per device type where it says so."""
    if not isinstance(estimate, dict) or not estimate.get("total_bytes"):
        return ""
    by_device = estimate.get("by_device") or {}
    if by_device:
        where = {"gpu": "on GPUs", "cpu": "on the CPU"}
        return "needs " + " or ".join(f"{size(b)} {where.get(d, 'on ' + d)}"
                                      for d, b in sorted(by_device.items()))
    return f"needs {size(estimate['total_bytes'])}"


def percent(value: Any) -> str:
    return "-" if value is None else f"{value:.0f}%"


def num(value: Any, unit: str = "") -> str:
    return "-" if value is None else f"{value:.0f}{unit}"


def bar(value: Any, width: int = 8) -> str:
    """`▕████▌   ▏ 56%`-style gauge of 0–100, in eighths of a cell."""
    if value is None:
        return " " * (width + 2) + "   -"
    value = max(0.0, min(100.0, float(value)))
    eighths = round(value / 100 * width * 8)
    full, part = divmod(eighths, 8)
    cells = "█" * full + (" ▏▎▍▌▋▊▉"[part] if part else "")
    return f"▕{cells.ljust(width)}▏{value:3.0f}%"


def span(seconds: Any) -> str:
    """A duration in its two largest units: 45s, 12m03s, 5h12m, 3d04h."""
    if seconds is None:
        return "-"
    seconds = max(0, int(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def ago(when: Any, now: float) -> str:
    return "-" if when is None else span(now - when) + " ago"


def source_label(source: Any) -> str:
    if not isinstance(source, dict):
        return str(source or "-")
    if source.get("kind") == "local":
        return str(source.get("path", "-"))
    repo = source.get("repo", "?")
    return f"hf://{repo}" + (f":{source['file']}" if source.get("file") else "")
