"""Instruction datasets on disk: JSONL or CSV rows with `prompt` and `response`.

Parsing errors name the file and the line; the contents (types, blanks, PII,
duplicates) are judged later by validate_data's expectation suite, so rows are
kept exactly as read.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any, Iterable

from llmops.core.errors import LlmopsError, Refused
from llmops.core.fs import write_text

REQUIRED_COLUMNS = ("prompt", "response")


class DataError(LlmopsError):
    """A dataset file that cannot be used: the message names the file and, where known, the line."""


class DataRefused(DataError, Refused):
    """Data that cannot be trained on as params say (its format, its rows' lengths), found before any work."""


def parse_instructions(raw: bytes, name: str, require: tuple[str, ...] = REQUIRED_COLUMNS) -> list[dict[str, Any]]:
    """Rows of a JSONL (one object per line) or CSV (header row) instruction file (see parse_rows)."""
    return [row for _, row in parse_rows(raw, name, require)]


def parse_rows(raw: bytes, name: str, require: tuple[str, ...] = REQUIRED_COLUMNS) -> list[tuple[int, dict[str, Any]]]:
    """(line number, row) of each row of a JSONL (one object per line) or CSV (header row) file.

    Args:
        raw: the file's bytes.
        name: its path or URI, for messages; its suffix picks the format.
        require: columns that must appear in some row.

    Raises:
        DataError: undecodable, malformed, empty, or lacking a required column.
    """
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(f"{name}: line {line}: not valid UTF-8") from None
    rows = _parse_csv(text, name) if name.lower().endswith(".csv") else _parse_jsonl(text, name)
    if not rows:
        raise DataError(f"{name}: empty dataset (no rows)")
    found = set().union(*(row.keys() for _, row in rows))
    missing = [c for c in require if c not in found]
    if missing:
        raise DataError(
            f"{name}: missing column(s) {', '.join(missing)} (found: {', '.join(sorted(found)) or 'none'})"
        )
    return rows


def jsonl_lines(text: str) -> list[str]:
    """The lines of a JSON Lines text: split on "\\n" alone, as the format says. str.splitlines() also splits on
    U+2028, U+0085 and other breaks, which JSON may carry unescaped inside a string (json.dumps(ensure_ascii=False)
    writes them so): one row became two halves, each invalid JSON."""
    return [line.removesuffix("\r") for line in text.split("\n")]


def _parse_jsonl(text: str, name: str) -> list[tuple[int, dict[str, Any]]]:
    rows = []
    for number, line in enumerate(jsonl_lines(text), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{name}: line {number}: invalid JSON: {exc.msg} (column {exc.colno})") from None
        if not isinstance(row, dict):
            raise DataError(f"{name}: line {number}: expected a JSON object, got {type(row).__name__}")
        rows.append((number, row))
    return rows


def _parse_csv(text: str, name: str) -> list[tuple[int, dict[str, Any]]]:
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = next(reader, None)
        if header is None:
            return []
        rows = []
        while True:
            start = reader.line_num + 1  # a quoted field may span lines: a row is named by its first
            fields = next(reader, None)
            if fields is None:
                break
            if not any(f.strip() for f in fields):
                continue
            if len(fields) != len(header):
                raise DataError(
                    f"{name}: line {reader.line_num}: {len(fields)} fields, the header has {len(header)}"
                )
            rows.append((start, dict(zip(header, fields, strict=True))))
        return rows
    except csv.Error as exc:
        raise DataError(f"{name}: line {reader.line_num}: malformed CSV: {exc}") from None


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict[str, Any]]) -> None:
    """Write rows as JSONL atomically, with a byte-stable encoding (sorted keys, UTF-8)."""
    write_text(path, "".join(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n" for row in rows))


def read_jsonl(path: str | os.PathLike, require: tuple[str, ...] = REQUIRED_COLUMNS) -> list[dict[str, Any]]:
    """Rows of a JSONL instruction file written by prepare_data (or by hand)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    return parse_instructions(raw, str(path), require)
