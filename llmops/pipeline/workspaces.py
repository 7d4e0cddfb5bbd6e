"""Every run builds in a workspace of its own: a git worktree under .llmops/workspaces/ that shares the project's DVC
cache.

A run of a commit (a worker's, a schedule's, a push's) checks that commit out; runs may overlap, and each writes the
params.yaml, dvc.lock, data/, models/ and reports/ of its own workspace, never the project checkout's or another
run's. A run of the checkout (`llmops run`) builds the checkout as it is: HEAD with the working tree's changes copied
over (`of_checkout`), and lands its outputs, dvc.lock and params.yaml in the checkout together, only once it has
built and registered its model (`land`): a run that fails, is refused or is interrupted leaves the checkout as it
was. The DVC cache is the project's: a stage computed before, in any workspace, is restored from DVC's run-cache
instead of running again (the stages a failed run completed, a param set back to an earlier value), and its files
are linked where the file system allows, not copied. A workspace is removed after its run succeeds and kept after a
failure, for inspection (`llmops workspaces`).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Iterator

from llmops.core import git
from llmops.core.errors import LlmopsError
from llmops.core.layout import WORKSPACES
from llmops.governance import apikeys


class WorkspaceError(LlmopsError):
    """The commit cannot be checked out into a workspace."""


CHECKPOINTS = Path("checkpoints")  # training's resumable checkpoints (llmops/pipeline/stages/train.py): the checkout's own


@dataclass
class Workspace:
    path: Path
    commit: str  # the full sha it holds (for a run of the checkout: HEAD, under the working tree's changes)
    # a run of the checkout: the sha256 of every file git sees, as the run began (the checkout's, copied over). What
    # the run changes among them (params.yaml, dvc.lock, the reports, .dvc/config's remote) lands in the checkout
    checkout: dict[str, str] | None = field(default=None)
    landed: bool = False  # what the run changed is in the checkout (land)


_git = partial(git.out, error=WorkspaceError)  # git's failures as a workspace's own error


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
    return _create(root, resolve(root, ref, fetch=True), name)


def of_checkout(root: str | os.PathLike, name: str) -> Workspace:
    """A workspace of the checkout as it is: HEAD, with every change `git status` shows (edited, new and deleted files
    that git does not ignore) copied over, so the run builds what it would build in the checkout. Training's
    checkpoints are the checkout's (a run interrupted mid-training resumes in the next run's workspace)."""
    root = Path(root).resolve()
    try:
        head = resolve(root, "HEAD")
    except WorkspaceError:
        raise WorkspaceError(f"{root} has no commit yet: a run builds in a git worktree of the checkout (`git add -A "
                             "&& git commit -m start`)") from None
    ws = _create(root, head, name, changes=True)
    (root / CHECKPOINTS).mkdir(exist_ok=True)
    (ws.path / CHECKPOINTS).symlink_to(root / CHECKPOINTS, target_is_directory=True)
    return Workspace(path=ws.path, commit=ws.commit, checkout=_seen(ws.path))


def _create(root: Path, sha: str, name: str, changes: bool = False) -> Workspace:
    path = root / WORKSPACES / f"{time.strftime('%Y%m%d-%H%M%S')}-{name}-{sha[:12]}"
    path.parent.mkdir(parents=True, exist_ok=True)
    _git(root, "worktree", "add", "--detach", str(path), sha)
    if changes:  # before DVC reads anything: dvc.yaml, dvc.lock and the *.dvc pointers may be among them
        _copy_changes(root, path)
    keys = root / apikeys.DEFAULT_FILE  # a stage's audit record names LLMOPS_TOKEN's key by the project's keys
    if keys.is_file():
        (path / apikeys.DEFAULT_FILE).parent.mkdir(parents=True, exist_ok=True)
        (path / apikeys.DEFAULT_FILE).symlink_to(keys)
    mine = root / ".dvc" / "config.local"  # this machine's DVC settings (a remote's credentials) apply there too
    if mine.is_file():
        shutil.copy2(mine, path / ".dvc" / "config.local")
    from dvc.config import Config

    with Config(dvc_dir=str(path / ".dvc")).edit("local") as conf:
        conf["cache"]["dir"] = str(root / ".dvc" / "cache")
        # reflink or hardlink, else copy: no stage edits an output in place (each writes a new file and renames it
        # over the old one), so nothing writes through a link into the cache
        conf["cache"]["type"] = ["reflink", "hardlink", "copy"]
    from llmops.pipeline.repro import dvc

    # the outputs that commit's dvc.lock pins (unchanged stages skip) and the files its *.dvc pointers track (the
    # monitor's corrections), from the cache
    dvc(path, "checkout", "--allow-missing", "--quiet", what="dvc checkout")
    return Workspace(path=path, commit=sha)


def _copy_changes(root: Path, path: Path) -> None:
    """The checkout's working-tree changes against HEAD (staged or not) and its files new to git, onto `path`."""
    changed = _git(root, "diff", "--name-only", "--no-renames", "-z", "HEAD").split("\0")
    changed += _git(root, "ls-files", "--others", "--exclude-standard", "-z").split("\0")
    for name in filter(None, changed):
        src, dest = root / name, path / name
        if src.is_symlink() or src.is_file():
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.unlink(missing_ok=True)
            shutil.copy2(src, dest, follow_symlinks=False)  # a copy: the run builds the files as they were at its start
        elif not src.exists():
            dest.unlink(missing_ok=True)


def link_inputs(ws: Workspace, root: str | os.PathLike, named: list[str]) -> None:
    """Link the files that params name and git does not hold (ignored, so neither checked out nor copied: a large
    dataset, a local base model) into the workspace, where the stages look for them: relative paths are the
    project's. Hard links, file by file (a symlink to a directory would escape a `dir/` ignore pattern and be
    committed with the release); a symlink per file where the file lies on another file system."""
    root = Path(root).resolve()
    for value in named:
        # (a relative path out of the project is refused before the run: llmops/pipeline/preflight.py)
        if "://" in value or os.path.isabs(os.path.expanduser(value)) or os.path.normpath(value).startswith(".."):
            continue
        dest = ws.path / value
        try:
            wanted = not dest.exists() and not dest.is_symlink() and (root / value).exists()
        except OSError:  # no path at all (a chat template's text)
            continue
        if wanted:
            src = (root / value).resolve()
            for file in sorted(src.rglob("*")) if src.is_dir() else [src]:
                if file.is_file():
                    _link(file, dest / file.relative_to(src) if src.is_dir() else dest)


def _link(src: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dest)
    except OSError:  # another file system
        dest.symlink_to(src)


class LandingError(WorkspaceError):
    """The run's outputs cannot land in the checkout; the message says why and where they are."""


def land(ws: Workspace, root: str | os.PathLike) -> None:
    """Put what the run changed in the checkout, all of it or (on any failure) none: the files git sees that it
    wrote (params.yaml, dvc.lock, the reports, .dvc/config's remote), then the outputs DVC caches, checked out from
    the cache (linked, not copied, where the checkout's cache type allows). Ctrl-C or SIGTERM meanwhile takes effect
    once it is done.

    Raises:
        LandingError: a file to land changed in the checkout while the run built (nothing is overwritten), or DVC's
            checkout failed (the checkout is put back as it was).
    """
    from llmops.core.fs import write_bytes
    from llmops.pipeline.repro import dvc

    root = Path(root).resolve()
    changed = check_landing(ws, root)
    before = {name: (root / name).read_bytes() if (root / name).is_file() else None for name in changed}
    with _deferred_signals():
        try:
            for name in changed:
                _put(root / name, ws.path / name)
            dvc(root, "checkout", "--force", "--quiet", what="dvc checkout")
            ws.landed = True
        except BaseException as exc:
            for name, data in before.items():
                if data is None:
                    (root / name).unlink(missing_ok=True)
                else:
                    write_bytes(root / name, data)
            said = f"the run's outputs could not be put in the checkout: {exc}\n"
            try:
                dvc(root, "checkout", "--force", "--quiet", "--allow-missing", what="dvc checkout")
            except LlmopsError:  # (DVC's lock is still held: it failed before changing anything)
                said += "params.yaml and dvc.lock are as they were (`dvc checkout --force` puts their outputs back)"
            else:
                said += "the checkout is as it was"
            raise LandingError(f"{said}; the run's outputs are in its workspace: {ws.path}") from None


def check_landing(ws: Workspace, root: str | os.PathLike) -> list[str]:
    """The files git sees that the run changed; refused where one changed in the checkout too since the run began: a
    person's edit is never overwritten (the flow checks before registering, so a refusal leaves no version behind).

    Raises:
        LandingError: naming the files and the workspace that holds the run's outputs.
    """
    assert ws.checkout is not None, "only a run of the checkout lands"
    now = _seen(ws.path)
    changed = sorted(name for name in {*now, *ws.checkout} if now.get(name) != ws.checkout.get(name))
    edited = [name for name in changed if _sha256(Path(root) / name) != ws.checkout.get(name)]
    if edited:
        raise LandingError(f"{', '.join(edited)} changed in the checkout while the run built; nothing of the run was "
                           f"put there (its outputs, dvc.lock and params.yaml are in its workspace: {ws.path})")
    return changed


def _seen(path: Path) -> dict[str, str]:
    """sha256 of every file git sees in a checkout (tracked or new, not ignored)."""
    names = _git(path, "ls-files", "--cached", "--others", "--exclude-standard", "-z").split("\0")
    return {name: digest for name in filter(None, names) if (digest := _sha256(path / name)) is not None}


def _sha256(path: Path) -> str | None:
    """A file's sha256 (a symlink's: of its target's name); None where there is none."""
    from llmops.core.provenance import sha256_file

    if path.is_symlink():
        return hashlib.sha256(os.readlink(path).encode()).hexdigest()
    return sha256_file(path) if path.is_file() else None


def _put(dest: Path, src: Path) -> None:
    """`src` over `dest`, atomically; `dest` removed where `src` is gone."""
    from llmops.core.fs import write_bytes

    if src.is_symlink():
        dest.unlink(missing_ok=True)
        dest.symlink_to(os.readlink(src))
    elif src.is_file():
        write_bytes(dest, src.read_bytes())
    else:
        dest.unlink(missing_ok=True)


@contextmanager
def _deferred_signals() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM for the block, then deliver them: a checkout half old and half new is worse than a run
    that stops a second later."""
    held: list[int] = []
    try:
        old = {sig: signal.signal(sig, lambda signum, frame: held.append(signum))
               for sig in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread: the signals are not ours to handle
        yield
        return
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        for sig in held[:1]:
            signal.raise_signal(sig)


def remove(root: str | os.PathLike, path: str | os.PathLike) -> None:
    _git(Path(root), "worktree", "remove", "--force", str(path))


def discard(root: str | os.PathLike, ws: Workspace) -> bool:
    """Remove a kept workspace unless a run is building in it (False)."""
    from llmops.core import locks

    try:
        with locks.exclusive(ws.path / locks.RUN_LOCK, "a pipeline run"):
            remove(root, ws.path)
    except locks.Busy:
        return False
    return True


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
