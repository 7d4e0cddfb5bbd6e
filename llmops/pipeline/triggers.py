"""Git-push retraining: a push to the watched branch that changes what the pipeline builds from (DVC pointers,
params.yaml, dvc.yaml) starts a run of the `on-push` deployment for the pushed commit, through the Prefect API.

Two callers, one rule: the server-side `post-receive` hook that `llmops install-hook` writes (ref updates on
stdin), and .github/workflows/retrain.yml (`--before/--after/--ref` from the push event). This module needs
only git and prefect, so the workflow runs it without the training stack:

    python -m llmops.pipeline.triggers --branch main --before OLD --after NEW --ref refs/heads/main
"""

from __future__ import annotations

import argparse
import asyncio
import os
import stat
import sys
from pathlib import Path

from llmops.core import git

DEPLOYMENT = "build-model/on-push"  # deployments/prefect.yaml
WATCHED = ("params.yaml", "dvc.yaml")  # and every *.dvc pointer
ZERO = "0" * 40  # git's "no commit": a branch created or deleted
HOOK_MARK = "# llmops: retrain on push"


class TriggerError(Exception):
    """A push that should start a run could not; the message says why."""


def changed(git_dir: str, before: str, after: str) -> list[str]:
    """The paths a push changed: `before..after`, or the tip commit's own changes when `before` is unknown
    (a new branch, or a history the clone does not have)."""
    diff = git.run(git_dir, "diff", "--name-only", before, after) if before != ZERO else None
    if diff is None or diff.returncode:
        diff = git.run(git_dir, "diff-tree", "--no-commit-id", "--name-only", "-r", "--root", after)
    if diff.returncode:
        raise TriggerError(f"git cannot list what {after[:12]} changed: {diff.stderr.strip()}")
    return diff.stdout.split()


def watched(paths: list[str]) -> list[str]:
    return [p for p in paths if p in WATCHED or p.endswith(".dvc")]


def start_run(deployment: str, sha: str, ref: str) -> str:
    """Create a flow run of `deployment` that builds `sha`; returns its name (push-<sha12>)."""
    from prefect.client.orchestration import get_client

    async def create() -> str:
        async with get_client() as client:
            found = await client.read_deployment_by_name(deployment)
            flow_run = await client.create_flow_run_from_deployment(
                found.id, parameters={"commit": sha}, name=f"push-{sha[:12]}", tags=["git-push"],
                idempotency_key=f"push-{sha}")  # the hook and the workflow for one push: one run
            return flow_run.name

    try:
        return asyncio.run(create())
    except Exception as exc:  # any failure to reach or use the server: the push is done, the run is not
        raise TriggerError(f"no run of {deployment!r} started for {sha[:12]} ({ref}): {type(exc).__name__}: "
                           f"{exc} (PREFECT_API_URL={os.environ.get('PREFECT_API_URL', 'unset')})") from None


def on_push(git_dir: str, branch: str, deployment: str, updates: list[tuple[str, str, str]]) -> list[str]:
    """Start a run for each update of `branch` that changes a watched file; returns what was done, a line each."""
    said = []
    for before, after, ref in updates:
        if ref != f"refs/heads/{branch}" or after == ZERO:
            continue
        paths = changed(git_dir, before, after)
        hits = watched(paths)
        if not hits:
            said.append(f"llmops: no retraining for {after[:12]}: it changes none of params.yaml, dvc.yaml or a "
                        f"*.dvc pointer ({len(paths)} other files)")
            continue
        name = start_run(deployment, after, ref)
        said.append(f"llmops: retraining started: flow run {name!r} builds {after[:12]} "
                    f"(changed: {', '.join(hits[:5])}{' ...' if len(hits) > 5 else ''})")
    return said


def install_hook(repo: str | os.PathLike, branch: str, deployment: str = DEPLOYMENT, force: bool = False) -> Path:
    """Write `repo`'s hooks/post-receive (a bare repository's, or a checkout's .git) to call `on_push`.

    Raises:
        TriggerError: not a git repository, no PREFECT_API_URL, or a post-receive hook of someone else's.
    """
    api = os.environ.get("PREFECT_API_URL")
    if not api:
        raise TriggerError("PREFECT_API_URL is not set: name the Prefect server the hook starts runs on")
    found = git.run(str(repo), "rev-parse", "--absolute-git-dir") if Path(repo).is_dir() else None
    if found is None or found.returncode:
        raise TriggerError(f"{repo}: not a git repository")
    hook = Path(found.stdout.strip()) / "hooks" / "post-receive"
    if hook.exists() and HOOK_MARK not in hook.read_text(errors="replace") and not force:
        raise TriggerError(f"{hook} exists and is not llmops's; pass --force to replace it")
    hook.parent.mkdir(exist_ok=True)
    # the API key, if the server needs one, comes from the git server's environment: never written to disk
    hook.write_text(f"""#!/bin/sh
{HOOK_MARK} (`llmops install-hook`): a push to {branch} that changes params.yaml, dvc.yaml or a *.dvc
# pointer starts a run of {deployment} for the pushed commit. The push itself never fails on it.
export PREFECT_API_URL='{api}'
exec '{sys.executable}' -m llmops.pipeline.triggers --branch '{branch}' --deployment '{deployment}' --git-dir .
""")
    hook.chmod(hook.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return hook


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmops.pipeline.triggers", description=__doc__.split("\n\n")[0])
    parser.add_argument("--branch", required=True, help="the branch the deployment watches")
    parser.add_argument("--deployment", default=DEPLOYMENT)
    parser.add_argument("--git-dir", default=".", help="the repository pushed to")
    parser.add_argument("--before", help="the branch's commit before the push (default: ref updates on stdin)")
    parser.add_argument("--after", help="the pushed commit")
    parser.add_argument("--ref", help="the pushed ref, e.g. refs/heads/main")
    args = parser.parse_args(argv)
    if args.after:
        updates = [(args.before or ZERO, args.after, args.ref or f"refs/heads/{args.branch}")]
    else:  # post-receive: "<old> <new> <ref>" per updated ref
        updates = [tuple(line.split()) for line in sys.stdin if len(line.split()) == 3]
    try:
        for line in on_push(args.git_dir, args.branch, args.deployment, updates):
            print(line)
    except TriggerError as exc:
        print(f"llmops: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
