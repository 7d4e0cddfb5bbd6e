"""Git, run one way: every git command llmops runs goes through `run`, `out` or `ok` here.

Ours over GitPython or dulwich because what we run is git's own command line (worktrees, annotated tags, atomic
pushes, commit-tree, post-receive hooks), which DVC needs installed anyway: a library would be a second vocabulary
for the same commands. What this module adds is one form for failures (the command and git's last line of
complaint, as the module's own error) and a time limit, so a hung remote cannot hang a run.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Mapping

from llmops.core.errors import LlmopsError

TIMEOUT_S = 120  # a push or fetch to an unreachable remote gives up instead of hanging a run


class GitError(LlmopsError):
    """A git command failed; the message names the command and what git said."""


def run(root: str | os.PathLike, *args: str, env: Mapping[str, str] | None = None, input: str | None = None,
        timeout: float = TIMEOUT_S) -> subprocess.CompletedProcess:
    """`git <args>` in `root`, its exit status left to the caller (text output; `env` replaces the environment).

    Raises:
        GitError: git cannot be started, or it ran past `timeout` seconds.
    """
    try:
        return subprocess.run(["git", *args], cwd=Path(root), capture_output=True, text=True, env=env, input=input,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        raise GitError(f"git {args[0]}: no answer within {timeout:.0f} s") from None
    except OSError as exc:
        raise GitError(f"git {args[0]}: cannot run git ({exc})") from None


def out(root: str | os.PathLike, *args: str, error: type[LlmopsError] = GitError, **kwargs) -> str:
    """`git <args>` in `root`: its output, stripped.

    Raises:
        `error` (GitError unless the caller names its own): git failed; the message ends with git's last line.
    """
    proc = run(root, *args, **kwargs)
    if proc.returncode:
        said = (proc.stderr or proc.stdout).strip().splitlines() or [f"exit status {proc.returncode}"]
        raise error(f"git {' '.join(args[:2])}: {said[-1]}")
    return proc.stdout.strip()


def ok(root: str | os.PathLike, *args: str, **kwargs) -> bool:
    """Whether `git <args>` succeeds in `root` (a question: does this ref exist, is this a repository)."""
    try:
        return run(root, *args, **kwargs).returncode == 0
    except GitError:
        return False


def answer(root: str | os.PathLike, *args: str, **kwargs) -> str | None:
    """`git <args>`'s output, or None where git fails or is missing: for facts that are optional (provenance)."""
    try:
        proc = run(root, *args, **kwargs)
    except GitError:
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None
