"""Resumable training checkpoints that are either complete or ignored.

Layout under a run's checkpoint directory:

    step-00000050/            complete: DeepSpeed's files + complete.json (written last, then renamed)
    .partial-step-00000100/   being written, or left by a crash: never loaded, removed on the next start

A checkpoint is complete only when its directory has the final name and holds
complete.json with the run's fingerprint (a hash of everything the training
processes consume). A checkpoint of other params or data is never resumed.

complete.json also holds the sha256 of every file of the checkpoint, taken when it
was completed. DeepSpeed loads its checkpoints with pickle, which can run code, so
only a checkpoint whose files still match (verified()) is ever loaded: a file
changed or planted since then makes it skipped, with a warning, for the previous one. The
training processes then check again, on the very bytes they unpickle (loader()): a file swapped
between the launcher's check and the load would otherwise run its code.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Callable

from llmops.core import provenance

MARKER = "complete.json"
_NAME = re.compile(r"^step-(\d{8})$")


def name(step: int) -> str:
    return f"step-{step:08d}"


def partial_name(step: int) -> str:
    return f".partial-{name(step)}"


def step_of(tag: str) -> int:
    return int(tag.removeprefix("step-"))


def _file_hashes(path: Path) -> dict[str, str]:
    return {str(f.relative_to(path)): provenance.sha256_file(f)
            for f in sorted(path.rglob("*")) if f.is_file() and f.name != MARKER}


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


def verified(root: str | os.PathLike, fingerprint: str, warn: Callable[[str], object] = print) -> tuple[int, Path] | None:
    """The newest complete checkpoint whose files are exactly those hashed when it was completed.

    A mismatch (a changed, missing or extra file) skips that checkpoint with a warning
    and falls back to the previous one, so a damaged checkpoint never fails every re-run.
    """
    for step, path in reversed(complete(root, fingerprint)):
        expected = json.loads((path / MARKER).read_text()).get("files")
        actual = _file_hashes(path)
        if expected == actual:
            return step, path
        expected = expected or {}
        changed = sorted(k for k in set(expected) | set(actual) if expected.get(k) != actual.get(k))
        warn(f"warning: checkpoint {path.name} skipped: its files differ from those hashed when it was completed "
             f"({', '.join(changed[:3]) or 'no file hashes recorded'}); falling back to an earlier one")
    return None


class Tampered(RuntimeError):
    """A checkpoint file's bytes are not those hashed when it was completed; nothing of it was unpickled."""


def loader(root: str | os.PathLike, tag: str) -> Callable[..., object]:
    """DeepSpeed's checkpoint load (`checkpoint_engine.load(path, map_location)`), on bytes read once, hashed, and
    unpickled only if they are the ones complete.json recorded for that file.

    Raises (when called):
        Tampered: the file differs, or complete.json names no such file.
    """
    import hashlib
    import io

    import torch

    checkpoint = Path(root) / tag
    expected = json.loads((checkpoint / MARKER).read_text()).get("files") or {}

    def load(path: str, map_location=None) -> object:
        relative = os.path.relpath(path, checkpoint)
        data = Path(path).read_bytes()
        if hashlib.sha256(data).hexdigest() != expected.get(relative):
            raise Tampered(f"checkpoint {tag}: {relative} is not the file hashed when the checkpoint was completed "
                           "(changed since it was checked); nothing of it was loaded: delete the checkpoint and run "
                           "again")
        return torch.load(io.BytesIO(data), map_location=map_location, weights_only=False)

    return load


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
    files = _file_hashes(partial)
    with open(marker, "w") as fh:
        json.dump({"step": step, "fingerprint": fingerprint, **info, "files": files}, fh)
        fh.flush()
        os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    partial.rename(final)
    for _, old in complete(root, fingerprint)[:-keep]:
        shutil.rmtree(old)
    return final
