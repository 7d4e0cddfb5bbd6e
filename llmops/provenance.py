"""Provenance written next to every artifact: code version, library versions, content hashes."""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import subprocess
from pathlib import Path

LIBRARIES = (
    "llmops", "torch", "deepspeed", "transformers", "peft", "tokenizers", "safetensors",
    "great_expectations", "dvc", "prefect", "pandas", "pydantic",
)


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def git_commit(root: str | os.PathLike = ".") -> dict[str, object]:
    """The commit the code was run from, and whether the work tree had uncommitted changes."""
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def library_versions() -> dict[str, str | None]:
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def manifest(params: dict, files: dict[str, Path], **extra: object) -> dict[str, object]:
    """A manifest: the resolved params, sha256 of each named file, git state, library versions, extras."""
    return {
        "params": params,
        "sha256": {name: sha256_file(path) for name, path in sorted(files.items())},
        "git": git_commit(),
        "libraries": library_versions(),
        **extra,
    }
