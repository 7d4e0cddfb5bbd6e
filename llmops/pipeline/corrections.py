"""Closing the loop: reviewers' accepted corrections become a new dataset version, and the pipeline retrains on it.

A version is one DVC-tracked file, data/corrections/accepted-<rows>.jsonl, holding every
accepted correction so far (prompt, response, task); `data.corrections` in params.yaml names
it, so prepare_data adds its rows to the train split and validate_data judges them with the
rest: nothing reaches training unvalidated. The new version is a commit of the project's
branch (the pointer and params.yaml, nothing else of the working tree), and its run starts
through llmops.pipeline.triggers, as a git push of that commit would start it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from llmops.core import git, locks
from llmops.core.config import PARAMS_FILE, Params, load_params, with_changes, write_params
from llmops.core.errors import LlmopsError
from llmops.core.fs import write_text
from llmops.governance import identity
from llmops.monitoring.checks import Checker, checker
from llmops.monitoring.report import Figures
from llmops.pipeline import triggers
from llmops.pipeline.prefect_api import OWN
from llmops.pipeline.repro import dvc
from llmops.serving.feedback import Store, database_url

DIR = Path("data/corrections")


class LoopError(LlmopsError):
    """No new dataset version or no run; the message says why and what to do."""


_git = partial(git.out, error=LoopError)  # git's failures as the loop's own error


@dataclass(frozen=True)
class DatasetVersion:
    commit: str
    parent: str  # the branch's commit before it
    branch: str
    path: str  # data/corrections/accepted-<rows>.jsonl
    rows: int
    new: int  # corrections not in the previous version


def new_version(root: Path, store: Store, check: Checker) -> DatasetVersion | None:
    """Write, `dvc add` and commit a dataset version holding every accepted correction; None when no accepted
    correction is missing from the data.

    Raises:
        LoopError: params.yaml has uncommitted changes (they would go into the commit), the checkout is not on a
            branch, or git or DVC failed. The corrections stay pending; the next monitor run tries again.
    """
    pending = store.accepted(unused_only=True)
    if not pending:
        return None
    with locks.exclusive(root / locks.RUN_LOCK, "a pipeline run"):  # never under a `llmops run` of this checkout
        if _git(root, "status", "--porcelain", "--", PARAMS_FILE, str(DIR)):
            raise LoopError(f"{PARAMS_FILE} or {DIR}/ has uncommitted changes: commit or stash them, and the next "
                            f"monitor run makes the new dataset version ({len(pending)} corrections wait)")
        try:
            branch = _git(root, "symbolic-ref", "--quiet", "--short", "HEAD")
        except LoopError:
            raise LoopError(f"{root} is not on a branch (detached HEAD): the new dataset version is a commit of the "
                            "branch the pipeline builds") from None
        parent = _git(root, "rev-parse", "HEAD")
        rows = store.accepted()
        path = DIR / f"accepted-{len(rows):06d}.jsonl"
        lines = []
        for row in rows:
            verdict = check(row["prompt"])
            lines.append(json.dumps({"prompt": row["prompt"], "response": row["correction"].strip(),
                                     "task": verdict[0] if verdict else "correction"}, ensure_ascii=False))
        old = load_params(root / PARAMS_FILE)
        try:
            write_text(root / path, "\n".join(lines) + "\n")
            dvc(root, "add", "--quiet", str(path), what="dvc add")  # into the DVC cache; the run's push uploads it
            if old.data.corrections and old.data.corrections != str(path):
                for stale in (Path(old.data.corrections), Path(old.data.corrections + ".dvc")):
                    (root / stale).unlink(missing_ok=True)  # its rows are all in the new version; git history keeps it
            write_params(root / PARAMS_FILE, with_changes(old, {"data.corrections": str(path)}))
            _git(root, "add", "-A", "--", PARAMS_FILE, str(DIR))
            who = identity.current(root)
            author = [] if identity.git_user() else ["-c", f"user.name={who}",  # a worker may have no
                                                     "-c", f"user.email={who}@llmops"]  # git identity
            _git(root, *author, "commit", "-q", "-m", f"llmops monitor: {len(rows)} accepted corrections "
                 f"({len(pending)} new) as {path}", "--", PARAMS_FILE, str(DIR))
        except BaseException:  # no half-made version: the checkout as it was, the corrections still pending
            _undo(root, path, old.data.corrections)
            raise
        store.mark_used([r["request_id"] for r in pending], str(path))
        return DatasetVersion(commit=_git(root, "rev-parse", "HEAD"), parent=parent, branch=branch, path=str(path),
                              rows=len(rows), new=len(pending))


def _undo(root: Path, path: Path, previous: str | None) -> None:
    """Put params.yaml and data/corrections/ back as HEAD has them, the previous version's file included."""
    (root / path).unlink(missing_ok=True)
    # each step on its own, its failure ignored: a path HEAD lacks must not stop the others
    git.run(root, "reset", "-q", "--", PARAMS_FILE, str(DIR))
    git.run(root, "checkout", "-q", "HEAD", "--", PARAMS_FILE)
    git.run(root, "checkout", "-q", "HEAD", "--", str(DIR))
    git.run(root, "clean", "-fdq", "--", str(DIR))  # the new pointer and .gitignore, and the directory if it was new
    if previous:
        try:
            dvc(root, "checkout", "--quiet", f"{previous}.dvc", what="dvc checkout")
        except LlmopsError:
            pass  # its pointer is back; `dvc checkout` restores the file later


def retrain(root: Path, version: DatasetVersion, deployment: str) -> list[str]:
    """Start the pipeline deployment on the version's commit through the git-push rule (it changed params.yaml and a
    DVC pointer), as a push of that commit would."""
    here = f"build it here with `llmops run --commit {version.commit[:12]}`"
    if os.environ.get(OWN):  # `llmops monitor` without PREFECT_API_URL: its own temporary server has no deployments
        raise LoopError(f"the new dataset version is commit {version.commit[:12]}; no Prefect server is named "
                        f"(PREFECT_API_URL), so no deployment can be started: {here}, or set PREFECT_API_URL to the "
                        f"server `llmops setup` registered {deployment} on")
    try:
        return triggers.on_push(str(root), version.branch, deployment,
                                [(version.parent, version.commit, f"refs/heads/{version.branch}")])
    except triggers.TriggerError as exc:
        raise LoopError(f"the new dataset version is commit {version.commit[:12]}, but {exc}; {here}, or start it "
                        f"on the server with `python -m llmops.pipeline.triggers --branch {version.branch} --after "
                        f"{version.commit}`") from None


def close_loop(root: Path, params: Params, figures: Figures | None) -> list[str]:
    """When retraining is due (monitor.retrain), a new dataset version from the accepted corrections and a run of the
    pipeline deployment on it; returns what was done, a line each (empty: not due)."""
    from llmops.monitoring.monitor import retrain_reason

    store = Store(database_url(root))
    pending = len(store.accepted(unused_only=True))
    reason = retrain_reason(figures, pending, params.monitor.retrain)
    if reason is None:
        return []
    if not pending:  # the same data would rebuild the same model (DVC skips every stage)
        return [f"retraining is due ({reason}) but there is no new data: review the queue (`llmops feedback queue`) "
                "and accept corrections"]
    version = new_version(root, store, checker(params.monitor.checkers))
    said = [f"retraining: {reason}", f"new dataset version {version.path} ({version.rows} corrections, {version.new} "
            f"new), commit {version.commit[:12]} on {version.branch}"]
    return said + retrain(root, version, params.monitor.retrain.deployment)
