"""Fingerprints of the files that params name for a stage to read (data.instructions, audit_bias.data, a harness
task's YAML and data...), so that DVC sees a file edited in place.

dvc.yaml cannot list those files: params choose them (null means "generate"), and they may lie outside the project
or in S3. The inputs stage writes, for each stage that reads such files, reports/inputs/<stage>.json: each local
file's sha256 (a directory's, file by file), each s3:// object's ETag and version. The stage depends on that file, so
an edit changes its fingerprint and DVC runs the stage again; unchanged fingerprints leave it skipped. A value that
is no local file and no s3:// URI (a hub id, a registry task name, a template's text, a file not there yet) has no
fingerprint: params.yaml, a dependency too, holds it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from llmops.core.config import Params, StorageParams, readers, stage_inputs

OUT_DIR = Path("reports/inputs")


def files(key: str, value: str, root: Path) -> list[Path]:
    """The local files behind one params value (a harness task: its YAML and its data; a directory: its files)."""
    if key == "evaluate.harness_tasks":
        from llmops.evaluation import harness

        return harness.files(value, root)
    path = root / os.path.expanduser(value)
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file())
    return [path] if path.is_file() else []


def fingerprint(key: str, value: str, root: Path, storage: StorageParams) -> list[dict[str, Any]]:
    """What identifies the contents behind `value`: [] when it names no local file and no s3:// object.

    Raises:
        StorageError: an s3:// object cannot be read (the stage that reads it would fail the same way).
    """
    from llmops.core.provenance import sha256_file

    if value.startswith("s3://"):
        from llmops.core.storage import explain, s3_client, split_s3_uri

        bucket, name = split_s3_uri(value)
        try:
            head = s3_client(storage).head_object(Bucket=bucket, Key=name)
        except Exception as exc:
            raise explain(exc, f"{key}: {value}", storage) from None
        return [{"key": key, "uri": value, "etag": head.get("ETag"), "version": head.get("VersionId"),
                 "size": head.get("ContentLength")}]
    return [{"key": key, "path": _named(path, root), "sha256": sha256_file(path)} for path in files(key, value, root)]


def _named(path: Path, root: Path) -> str:
    """A file's path relative to the project, or absolute outside it: the same in every workspace a run builds in."""
    relative = os.path.relpath(path, root)
    return str(path) if relative.startswith("..") else relative


def write(root: str | os.PathLike, params: Params, storage: StorageParams) -> dict[str, int]:
    """Write reports/inputs/<stage>.json for every stage that reads named files; stage -> files fingerprinted."""
    import json

    from llmops.core.fs import write_text

    root = Path(root)
    named = stage_inputs(params)
    counts = {}
    for stage in readers():
        prints = [one for key, value in named.get(stage, []) for one in fingerprint(key, value, root, storage)]
        write_text(root / OUT_DIR / f"{stage}.json", json.dumps(prints, indent=1) + "\n")
        counts[stage] = len(prints)
    return counts
