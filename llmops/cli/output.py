"""How the commands that list or show things print: a table under a header row for people, JSON for programs.

With --json a list command prints JSON Lines (one object per line, the same keys on each: `| head`, `| jq`, a
line-by-line reader all work on it, and an empty list prints nothing); a show command prints one JSON document.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any


def table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """Left-aligned columns two spaces apart under `header`; an empty cell is '-', so that no column goes missing
    from a line split on whitespace (free text, which may hold spaces, goes last)."""
    lines = [list(header), *([str(cell) if cell not in (None, "") else "-" for cell in row] for row in rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
    return "\n".join("  ".join([*(c.ljust(w) for c, w in zip(line, widths)), line[-1]]).rstrip() for line in lines)


def json_lines(records: Iterable[dict[str, Any]]) -> str:
    """One JSON object a line; keys sorted, so that two listings diff line by line."""
    return "\n".join(json.dumps(r, sort_keys=True, default=str) for r in records)


def show(text: str) -> None:
    """Print `text`, unless it is empty: an empty listing in JSON Lines is no line at all."""
    if text:
        print(text)


def add_json(parser, what: str) -> None:
    """The --json flag, worded the same on every command."""
    parser.add_argument("--json", action="store_true", help=f"machine-readable: {what}")
