"""The DVC remote, kept in step with params.yaml's storage section."""

from __future__ import annotations

import os

from llmops.config import StorageParams
from llmops.repro import dvc

REMOTE = "storage"


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


def push(root: str | os.PathLike, storage: StorageParams) -> str:
    """Configure the remote and push every output in dvc.lock to it."""
    configure_remote(root, storage)
    return dvc(root, "push", "--remote", REMOTE, what="push")
