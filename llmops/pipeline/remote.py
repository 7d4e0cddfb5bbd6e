"""The DVC remote, kept in step with params.yaml's storage section."""

from __future__ import annotations

import os
import re
from pathlib import Path

from llmops.core.config import StorageParams
from llmops.pipeline.repro import StageError, dvc

REMOTE = "storage"

# dvc-objects' LocalFileSystem.put_file copies each object to `<dir>/.<secrets.token_urlsafe(16)>.tmp`
# and renames it into place; on a failed write (ENOSPC, EFBIG) it raises without removing the partial file.
_DVC_TMP = re.compile(r"\.[A-Za-z0-9_-]{22}\.tmp")


def configure_remote(root: str | os.PathLike, storage: StorageParams) -> None:
    """Point the project's default DVC remote at `storage`.

    Written to .dvc/config (the project's, committed) so a fresh clone's `dvc pull`
    finds the data; credentials are not written, DVC reads the standard AWS sources.
    """
    dvc(root, "remote", "add", "--force", "--default", REMOTE, storage.url)
    for option in ("endpointurl", "region"):
        value = {"endpointurl": storage.endpoint_url, "region": storage.region}[option]
        if storage.remote == "s3" and value:
            dvc(root, "remote", "modify", REMOTE, option, value)


def _temp_files(remote_dir: Path) -> set[Path]:
    """DVC's partial uploads under a local remote (files named exactly as dvc-objects names them)."""
    return {
        Path(parent, name)
        for parent, _, files in os.walk(remote_dir)
        for name in files
        if _DVC_TMP.fullmatch(name)
    }


def push(root: str | os.PathLike, storage: StorageParams) -> str:
    """Configure the remote and push every output in dvc.lock to it.

    Raises:
        StageError: the push failed; one line. For a local remote, the partial files this
            push wrote are removed first: DVC leaves them behind when a write fails (a full
            disk), and they would keep that disk full.
    """
    configure_remote(root, storage)
    if storage.remote != "local":
        return dvc(root, "push", "--remote", REMOTE, what="push")
    remote_dir = Path(root, os.path.expanduser(storage.url))
    before = _temp_files(remote_dir)
    try:
        return dvc(root, "push", "--remote", REMOTE, what="push")
    except StageError as exc:
        left = []
        for tmp in sorted(_temp_files(remote_dir) - before):
            try:
                tmp.unlink()
            except FileNotFoundError:
                pass
            except OSError:
                left.append(tmp)
        cleanup = (
            f"{len(left)} partial file(s) could not be removed, e.g. {left[0]}" if left
            else "nothing partial was left on the remote"
        )
        raise StageError(f"push to {storage.url} failed: {_one_line(str(exc))}; {cleanup}") from None


def _one_line(message: str) -> str:
    """DVC's summary (its last ERROR line) and the OS error behind it, e.g. "[Errno 28] No space left on device"."""
    lines = message.removeprefix("push failed: ").strip().splitlines() or ["unknown error"]
    summary = lines[-1].strip()
    cause = re.search(r"\[Errno \d+\] [^:'\n]+", message)
    if cause and cause.group(0).strip() not in summary:
        summary += f" ({cause.group(0).strip()})"
    return summary
