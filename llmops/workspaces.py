"""A run's own checkout of the commit it builds: a git worktree under .llmops/workspaces/ that shares the project's DVC
cache.

Runs that a worker, a schedule or a push starts may overlap; each writes the params.yaml,
dvc.lock, data/ and models/ of its own workspace, never the project checkout's or another
run's. The DVC cache, run-cache included, is the project's: a stage another run already
computed is restored from it (DVC's run-cache), and its files are linked where the file
system allows, not copied. A workspace is removed after its run succeeds and kept after a
failure, for inspection (`llmops workspaces`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from llmops.errors import LlmopsError

WORKSPACES = Path(".llmops/workspaces")


class WorkspaceError(LlmopsError):
    """The commit cannot be checked out into a workspace."""


@dataclass(frozen=True)
class Workspace:
    path: Path
    commit: str  # the full sha it holds


def _git(root: Path, *args: str) -> str:
    proc = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
    if proc.returncode:
        said = (proc.stderr or proc.stdout).strip().splitlines() or [f"exit status {proc.returncode}"]
        raise WorkspaceError(f"git {' '.join(args)}: {said[-1]}")
    return proc.stdout.strip()


def resolve(root: str | os.PathLike, ref: str, fetch: bool = False) -> str:
    """The full sha of a commit, branch or tag of the project's repository; with `fetch`, one it does not have yet
    is fetched from its git remotes first (a commit just pushed to the shared repository)."""
    try:
        return _git(Path(root), "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}")
    except WorkspaceError:
        if fetch and _git(Path(root), "remote"):
            from filelock import FileLock

            # runs started by one push fetch at once, and git refuses a ref two fetches update together
            (Path(root) / ".llmops").mkdir(exist_ok=True)
            with FileLock(Path(root) / ".llmops" / "fetch.lock", timeout=300):
                _git(Path(root), "fetch", "--quiet", "--all")
            return resolve(root, ref)
        raise WorkspaceError(f"commit {ref!r}: no such commit, branch or tag in {root}") from None


def create(root: str | os.PathLike, ref: str, name: str) -> Workspace:
    """Check `ref` out into a new workspace named after the run; its DVC cache is the project's."""
    root = Path(root).resolve()
    sha = resolve(root, ref, fetch=True)
    path = root / WORKSPACES / f"{time.strftime('%Y%m%d-%H%M%S')}-{name}-{sha[:12]}"
    path.parent.mkdir(parents=True, exist_ok=True)
    _git(root, "worktree", "add", "--detach", str(path), sha)
    mine = root / ".dvc" / "config.local"  # this machine's DVC settings (a remote's credentials) apply there too
    if mine.is_file():
        shutil.copy2(mine, path / ".dvc" / "config.local")
    from dvc.config import Config

    with Config(dvc_dir=str(path / ".dvc")).edit("local") as conf:
        conf["cache"]["dir"] = str(root / ".dvc" / "cache")
        # reflink or hardlink, else copy: no stage edits an output in place (each writes a new file and renames it
        # over the old one), so nothing writes through a link into the cache
        conf["cache"]["type"] = ["reflink", "hardlink", "copy"]
    from llmops.repro import dvc

    # the outputs that commit's dvc.lock pins (unchanged stages skip) and the files its *.dvc pointers track (the
    # monitor's corrections), from the cache
    dvc(path, "checkout", "--allow-missing", "--quiet", what="dvc checkout")
    return Workspace(path=path, commit=sha)


def remove(root: str | os.PathLike, path: str | os.PathLike) -> None:
    _git(Path(root), "worktree", "remove", "--force", str(path))


def kept(root: str | os.PathLike) -> list[Workspace]:
    """The workspaces still on disk (a run failed in each, or is running in it), oldest first."""
    root = Path(root).resolve()
    found, path = [], None
    for line in _git(root, "worktree", "list", "--porcelain").splitlines():
        if line.startswith("worktree "):
            path = Path(line.split(" ", 1)[1])
        elif line.startswith("HEAD ") and path is not None and (root / WORKSPACES) in path.parents:
            found.append(Workspace(path=path, commit=line.split(" ", 1)[1]))
    return sorted(found, key=lambda w: w.path.name)
