"""Small plain-text summary tables for the end of every job."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def format_table(title: str, rows: Iterable[tuple[str, Any]]) -> str:
    """Two-column table with a title, e.g. the pretokenize summary."""
    rows = [(str(k), _fmt(v)) for k, v in rows]
    kw = max([len(k) for k, _ in rows] + [len(title)])
    vw = max([len(v) for _, v in rows] + [1])
    line = "+" + "-" * (kw + 2) + "+" + "-" * (vw + 2) + "+"
    out = [line, f"| {title.ljust(kw + vw + 3)} |", line]
    out += [f"| {k.ljust(kw)} | {v.rjust(vw)} |" for k, v in rows]
    out.append(line)
    return "\n".join(out)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)
