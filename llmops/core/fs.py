"""Files and directories written whole or not at all: a crash, a full disk or Ctrl-C leaves the old one (or none),
never half of a new one. Every writer of the project goes through here.

No library fits: `atomicwrites` is unmaintained and knows no directories, and the swap of a directory needs the
old one kept until the new one is in place.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def write_bytes(path: str | os.PathLike, data: bytes, private: bool = False) -> None:
    """Write `path` atomically (a temporary file beside it, flushed to disk, then renamed over it).

    `private`: readable by its owner only, from the first byte (a key, a password).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _beside(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o666)  # (less the umask)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: str | os.PathLike, text: str, private: bool = False) -> None:
    """Write `path` atomically as UTF-8 with "\\n" line ends (see write_bytes)."""
    write_bytes(path, text.encode("utf-8"), private)


@contextmanager
def writing(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside `path`, for a writer that wants a name (matplotlib, Evidently, a directory built file
    by file): put in place of `path` when the block ends well, removed when it does not."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _beside(path)
    try:
        yield tmp
        if tmp.is_dir():
            replace_dir(tmp, path)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


def fetch_into(target: str | os.PathLike, fetch: Callable[[Path], object]) -> Path:
    """`target`, fetched once: `fetch(path)` downloads it (a file or a directory) to a temporary path beside it, which
    then becomes `target` in one rename, so `target` is complete or absent. Where another process put `target` in
    place first, theirs is kept (it is complete too, and may be in use)."""
    target = Path(target)
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _beside(target)
    try:
        fetch(tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # a directory there already (not empty): another fetch won
            if not target.exists():
                raise
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
    return target


def replace_dir(tmp: str | os.PathLike, dest: str | os.PathLike) -> None:
    """Swap a fully written directory `tmp` in at `dest`; until the last rename the old `dest` stays whole."""
    tmp, dest = Path(tmp), Path(dest)
    old = dest.with_name(f".{dest.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if dest.exists():
        dest.rename(old)
    tmp.rename(dest)
    shutil.rmtree(old, ignore_errors=True)


def _beside(path: Path) -> Path:
    """A hidden name in `path`'s directory (the same file system, so the rename is atomic), unique to this writer."""
    return path.with_name(f".{path.stem}.{secrets.token_hex(4)}.tmp{path.suffix}")  # (the suffix says the format)
