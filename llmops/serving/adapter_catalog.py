"""What a multi-adapter server serves: one base, and the LoRA adapter of every registered version built on it.

The base is the one the followed version (production, by default) was fine-tuned from, as its
lineage records it (release.json `sources.base`: the weights' hashes, or a hub id). A version is
served when its release holds an adapter (models/release/adapter/) and its lineage names the same
base; the stage holders always, then the newest, up to `max_adapters`. Every other version is
listed with the reason it is not served (another base, no adapter), so a request for it gets that
reason. Files come from the DVC cache or remote at the version's commit: the base once (stored by
its hash, shared by every version), and each adapter (a few MB) on its own.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from llmops.core.errors import LlmopsError
from llmops.core.fs import fetch_into
from llmops.registry import versions as registry
from llmops.serving.instances import SERVE_DIR

BASES_DIR = SERVE_DIR / "bases"
ADAPTERS_DIR = SERVE_DIR / "adapters"


class CatalogError(LlmopsError):
    """The followed version cannot be served with adapters; what serves now keeps serving."""


@dataclass(frozen=True)
class Catalog:
    """The followed version, its base, the versions served on it, and production's canary."""

    base_id: str  # a short digest of the base's identity
    follows: registry.Version
    served: tuple[registry.Version, ...]  # versions whose adapters are served, newest first
    refused: dict[str, str] = field(default_factory=dict)  # other versions -> why they are not served
    canary: registry.Canary | None = None  # when the server follows production and a version holds canary


def base_identity(version: registry.Version) -> dict | None:
    return version.lineage.get("sources", {}).get("base")


def _digest(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]


def plan(root: str | os.PathLike, ref: str, max_adapters: int) -> Catalog:
    """The catalog for a server following `ref` (a stage or a version); nothing is downloaded.

    Raises:
        CatalogError: the followed version has no adapter to share a base with (a release made before adapters were
            kept, or a prompt-tuning one), or the registry cannot be read.
    """
    try:
        known = registry.versions(root)
        follows = registry.resolve(root, ref)
        canary = registry.canary(root, known) if ref == "production" else None  # a share of production's requests
    except registry.RegistryError as exc:
        raise CatalogError(str(exc)) from None
    identity = base_identity(follows)
    if not follows.lineage.get("adapter") or identity is None:
        raise CatalogError(f"{follows.version} has no LoRA adapter in its release (a prompt-tuning version, or one "
                           "released before releases kept their adapter): serve it on its own (without --adapters)")
    served, refused = [], {}
    holders = [v for v in known if v.stages]
    for v in holders + [v for v in known if not v.stages]:  # stage holders first, then newest first
        if not v.lineage.get("adapter"):
            refused[v.version] = f"{v.version} has no LoRA adapter in its release"
        elif base_identity(v) != identity:
            refused[v.version] = (f"{v.version} is built on another base ({_describe(base_identity(v))}) than this "
                                  f"server's ({_describe(identity)})")
        elif len(served) >= max_adapters and not v.stages:
            refused[v.version] = (f"{v.version} is not among the {max_adapters} newest versions served here "
                                  "(deploy.max_adapters)")
        else:
            served.append(v)
    served.sort(key=lambda v: registry._semver(v.version), reverse=True)
    return Catalog(base_id=_digest(identity), follows=follows, served=tuple(served), refused=refused, canary=canary)


def _describe(identity: dict | None) -> str:
    if not identity:
        return "unknown"
    return identity.get("hub_id") or f"{identity.get('path')} {_digest(identity)}"


def base_dir(root: str | os.PathLike, catalog: Catalog) -> str:
    """The base's files (a local copy, fetched once per base) or its hub id."""
    identity = base_identity(catalog.follows)
    if "hub_id" in identity:
        return identity["hub_id"]
    return str(_fetch(root, catalog.follows, identity["path"], Path(root) / BASES_DIR / catalog.base_id))


def adapter_dir(root: str | os.PathLike, version: registry.Version) -> Path:
    """The version's adapter (fetched once)."""
    path = f"{registry.RELEASE}/{version.lineage['adapter']}"  # release.json says where (llmops/pipeline/stages/release.py)
    return _fetch(root, version, path, Path(root) / ADAPTERS_DIR / version.version)


def _fetch(root: str | os.PathLike, version: registry.Version, path: str, target: Path) -> Path:
    """`path` as it is at the version's commit, from the DVC cache or remote, into `target` (complete or absent)."""
    from dvc.api import DVCFileSystem

    try:
        return fetch_into(target, lambda tmp: DVCFileSystem(str(root), rev=version.commit).get(
            path, str(tmp), recursive=True))
    except Exception as exc:  # DVC's own errors: an unreachable remote, files never pushed
        raise CatalogError(f"{version.version}: {path} cannot be fetched from the DVC cache or remote: "
                           f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
