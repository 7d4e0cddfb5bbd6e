"""Provenance written next to every artifact: code version, library versions, content hashes."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
from pathlib import Path
from typing import Any, Iterable

from llmops.core import git

LIBRARIES = (
    "llmops", "torch", "deepspeed", "transformers", "peft", "tokenizers", "safetensors",
    "great_expectations", "dvc", "prefect", "pandas", "pydantic", "scipy", "torchao", "bitsandbytes",
)


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def git_commit(root: str | os.PathLike = ".") -> dict[str, object]:
    """The commit the code was run from, and whether the work tree had uncommitted changes."""
    return {"commit": git.answer(root, "rev-parse", "HEAD", timeout=30),
            "dirty": bool(git.answer(root, "status", "--porcelain", "--untracked-files=no", timeout=30))}


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


def model_hashes(path: str | os.PathLike, root: str | os.PathLike = ".") -> dict[str, object]:
    """What identifies a model a report was made with: the sha256 of its weights and configs, or its hub id.

    A model directory of ours carries a manifest.json whose weight hashes were checked when
    the model was loaded (modeling.verify_model_dir); those are reused rather than read again.
    """
    local = Path(root) / path
    if not local.is_dir():
        return {"hub_id": str(path)}
    recorded = {}
    if (local / "manifest.json").is_file():
        recorded = json.loads((local / "manifest.json").read_text()).get("sha256", {})
    files = sorted(f for f in local.iterdir() if f.suffix in (".safetensors", ".json") and f.name != "manifest.json")
    return {"path": str(path), "sha256": {f.name: recorded.get(f.name) or sha256_file(f) for f in files}}


def write_report_manifest(out_dir: str | os.PathLike, params: Any, root: str | os.PathLike = ".",
                          data: Iterable[str | os.PathLike] = (), models: dict[str, Any] | None = None,
                          **extra: object) -> None:
    """manifest.json beside a report: the stage's params, the hashes of the data and models it read, the code version.

    `models` maps a name to a model's path (hashed by model_hashes) or to model_hashes' result.
    """
    from llmops.core.fs import write_text

    root = Path(root)
    body = {
        "params": params.model_dump(mode="json") if hasattr(params, "model_dump") else params,
        "data": {str(p): sha256_file(root / p) for p in data},
        "models": {name: path if isinstance(path, dict) else model_hashes(path, root)
                   for name, path in (models or {}).items()},
        "git": git_commit(root),
        "libraries": library_versions(),
        **extra,
    }
    write_text(Path(out_dir) / "manifest.json", json.dumps(body, indent=2, sort_keys=True) + "\n")
