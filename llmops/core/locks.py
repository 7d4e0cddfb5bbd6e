"""Exclusive locks that keep two runs from writing into one checkout's files at once.

fcntl.flock rather than the `filelock` package: the message must name the process
holding the lock, so the holder writes itself into the lock file, and `filelock`
truncates that file on every attempt to acquire it. The kernel drops a flock when
its holder dies, so a killed run never leaves a stale lock behind.
"""

from __future__ import annotations

import fcntl
import itertools
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from llmops.core import layout
from llmops.core.errors import LlmopsError

RUN_LOCK = layout.RUN_LOCK  # one pipeline run per checkout

_HELD: set[Path] = set()  # locks this process holds: taking one again is a no-op (the CLI, then its flow)


class Busy(LlmopsError):
    """Another process holds the lock; the message names it."""


@contextmanager
def exclusive(path: str | os.PathLike, what: str) -> Iterator[None]:
    """Hold an exclusive lock on `path` while the block runs; refuse at once if another process holds it.

    Raises:
        Busy: "<what> is already running in this checkout (pid N, since HH:MM:SS: command)".
    """
    path = Path(path).resolve()
    if path in _HELD:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            raise Busy(f"{what} is already running in this checkout ({holder}); "
                       "wait for it to end, or stop it, then try again") from None
        fh.seek(0)
        fh.truncate()
        # the command and its verbs, not its values: a lock file is read by whoever waits, and `erase --subject X`
        # must not leave X in it (nor a secret given on a command line)
        command = " ".join([Path(sys.argv[0]).name, *itertools.takewhile(lambda a: not a.startswith("-"),
                                                                           sys.argv[1:])])
        fh.write(f"pid {os.getpid()}, since {time.strftime('%H:%M:%S')}: {command}")
        fh.flush()
        _HELD.add(path)
        try:
            yield
        finally:
            _HELD.discard(path)
            fh.truncate(0)
