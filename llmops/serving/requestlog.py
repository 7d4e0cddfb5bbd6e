"""The servers' request log: append-only JSON lines, one file per process per day, in Hive-style day partitions.

    <log dir>/date=2026-11-26/<host>-<pid>.jsonl

A file has one writer (its process), so lines never interleave, and a day's partition is all
a window of that day needs: the monitor lists the partitions its window covers and reads only
those, locally or under an s3:// prefix with the same layout (where a log shipper such as
Vector or Fluent Bit, or `aws s3 sync`, puts them). Athena, ClickHouse or Spark read the
same layout as a table partitioned by `date`.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from llmops.core import layout
from llmops.core.config import StorageParams
from llmops.core.errors import LlmopsError
from llmops.data.datasets import jsonl_lines

LOG_DIR = layout.REQUESTS

PARTITION = "date="


class LogError(LlmopsError):
    """The request log cannot be read; the message says where."""


def _now() -> datetime:
    return datetime.now(timezone.utc)


def stamp(moment: datetime) -> str:
    """The log's time format: UTC, ISO 8601 with milliseconds and a Z (sorts as text)."""
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(timezone.utc)


class Writer:
    """Appends records to this process's file of the current UTC day under `directory`."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.name = f"{socket.gethostname()}-{os.getpid()}.jsonl"

    def write(self, record: dict[str, Any]) -> None:
        moment = _now()
        path = self.directory / f"{PARTITION}{moment:%Y-%m-%d}" / self.name
        path.parent.mkdir(parents=True, exist_ok=True)
        # one write of one whole line per record, to a file only this process appends to
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"time": stamp(moment), **record}, ensure_ascii=False) + "\n")


@dataclass
class Window:
    """The records of a time window, and the lines that could not be read (kept in the log, reported here)."""

    start: datetime
    end: datetime
    records: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # "file:line: why"
    files: int = 0


def days(start: datetime, end: datetime) -> list[str]:
    """The partitions (YYYY-MM-DD) a window [start, end) touches."""
    first = start.astimezone(timezone.utc).date()
    last = (end - timedelta(microseconds=1)).astimezone(timezone.utc).date()  # the end is not in the window
    return [str(first + timedelta(days=i)) for i in range((last - first).days + 1)]


def read_window(location: str | os.PathLike, start: datetime, end: datetime,
                storage: StorageParams | None = None) -> Window:
    """The records logged in [start, end), from a local log directory or an s3:// prefix; only the partitions of the
    window's days are listed and read. A corrupt line is skipped and named in `skipped`, never fatal.

    Raises:
        LogError: the location cannot be listed or a file cannot be read (the message names it).
    """
    window = Window(start=start, end=end)
    for name, text in _files(str(location), days(start, end), storage):
        window.files += 1
        for number, line in enumerate(jsonl_lines(text), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                moment = parse_time(record["time"])
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                window.skipped.append(f"{name}:{number}: {type(exc).__name__}: {str(exc)[:80]}")
                continue
            if start <= moment < end:
                window.records.append(record)
    window.records.sort(key=lambda r: r["time"])
    return window


def _files(location: str, partitions: list[str], storage: StorageParams | None):
    if location.startswith("s3://"):
        yield from _s3_files(location, partitions, storage or StorageParams())
        return
    root = Path(location).expanduser()
    if not root.is_dir():
        raise LogError(f"{location}: no request log there (a server started in this project writes it)")
    for day in partitions:
        for path in sorted((root / f"{PARTITION}{day}").glob("*.jsonl")):
            try:
                yield str(path), path.read_text(encoding="utf-8", errors="replace")
            except OSError as exc:
                raise LogError(f"{path}: {exc.strerror}") from None


def _s3_files(location: str, partitions: list[str], storage: StorageParams):
    from llmops.core.storage import explain, s3_client

    bucket, _, prefix = location.removeprefix("s3://").partition("/")
    prefix = f"{prefix.strip('/')}/" if prefix.strip("/") else ""
    client = s3_client(storage)
    try:
        for day in partitions:
            pages = client.get_paginator("list_objects_v2").paginate(
                Bucket=bucket, Prefix=f"{prefix}{PARTITION}{day}/")
            for page in pages:
                for item in page.get("Contents", []):
                    if item["Key"].endswith(".jsonl"):
                        body = client.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
                        yield f"s3://{bucket}/{item['Key']}", body.decode("utf-8", errors="replace")
    except Exception as exc:
        raise LogError(str(explain(exc, location, storage))) from None
