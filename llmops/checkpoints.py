"""Resumable training checkpoints that are either complete or ignored.

Layout under a run's checkpoint directory:

    step-00000050/            complete: DeepSpeed's files + complete.json (written last, then renamed)
    .partial-step-00000100/   being written, or left by a crash: never loaded, removed on the next start

A checkpoint is complete only when its directory has the final name and holds
complete.json with the run's fingerprint (a hash of everything the training
processes consume). A checkpoint of other params or data is never resumed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

MARKER = "complete.json"
_NAME = re.compile(r"^step-(\d{8})$")


def name(step: int) -> str:
    return f"step-{step:08d}"


def partial_name(step: int) -> str:
    return f".partial-{name(step)}"


def complete(root: str | os.PathLike, fingerprint: str) -> list[tuple[int, Path]]:
    """Complete checkpoints of this run, oldest first."""
    found = []
    root = Path(root)
    if not root.is_dir():
        return found
    for path in root.iterdir():
        m = _NAME.match(path.name)
        if not m or not (path / MARKER).is_file():
            continue
        try:
            info = json.loads((path / MARKER).read_text())
        except (OSError, ValueError):
            continue
        if info.get("fingerprint") == fingerprint and info.get("step") == int(m.group(1)):
            found.append((int(m.group(1)), path))
    return sorted(found)


def latest(root: str | os.PathLike, fingerprint: str) -> tuple[int, Path] | None:
    found = complete(root, fingerprint)
    return found[-1] if found else None


def clean(root: str | os.PathLike, fingerprint: str) -> list[str]:
    """Remove partial checkpoints and those of other runs; returns what was removed (for the log)."""
    root = Path(root)
    keep = {path for _, path in complete(root, fingerprint)}
    removed = []
    if root.is_dir():
        for path in root.iterdir():
            if path.is_dir() and path not in keep and (path.name.startswith(".partial-") or _NAME.match(path.name)):
                shutil.rmtree(path)
                removed.append(path.name)
    return sorted(removed)


def commit(root: str | os.PathLike, step: int, fingerprint: str, keep: int, info: dict) -> Path:
    """Mark the partial checkpoint of `step` complete (marker, then an atomic rename) and prune old ones."""
    root = Path(root)
    partial, final = root / partial_name(step), root / name(step)
    marker = partial / MARKER
    with open(marker, "w") as fh:
        json.dump({"step": step, "fingerprint": fingerprint, **info}, fh)
        fh.flush()
        os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    partial.rename(final)
    for _, old in complete(root, fingerprint)[:-keep]:
        shutil.rmtree(old)
    return final
