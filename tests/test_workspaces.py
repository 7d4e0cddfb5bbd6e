"""A run that builds a commit works in a workspace of its own (a git worktree sharing the DVC cache): the project
checkout is never written, a success removes the workspace, a failure keeps it for inspection."""

from __future__ import annotations

import pytest

from conftest import run, set_params, snapshot

pytestmark = pytest.mark.training

CHECKOUT = ("params.yaml", "dvc.lock", "models", "data/prepared", "reports")


@pytest.fixture
def committed(ran_project):
    """The session's pipeline with its dvc.lock and reports (DVC leaves uncached outputs to git) committed, as a team
    commits them after a run."""
    run(["git", "add", "dvc.lock", "reports"], ran_project)
    run(["git", "commit", "-qm", "pipeline run"], ran_project)
    return ran_project


def test_a_commit_is_built_in_its_own_workspace_and_the_checkout_is_untouched(committed):
    project = committed
    set_params(project, "audit_bias.pairs_per_type=5")  # an edit in the checkout, not in the commit: not used
    before = snapshot(project, *CHECKOUT)
    head = run(["git", "rev-parse", "HEAD"], project).stdout.strip()
    proc = run(["llmops", "run", "--no-push", "--commit", "main", "-S", "evaluate.max_new_tokens=4"], project)
    assert f"Pipeline completed: commit {head[:12]} built in a workspace of its own (now removed)" in proc.stdout
    out = proc.stdout + proc.stderr
    for stage in ("prepare_data", "train@pretrain", "train@finetune", "audit_bias"):  # restored from the cache
        assert f"{stage}: unchanged since the last run" in out
    assert "evaluate: unchanged" not in out  # its param changed: it ran, in the workspace
    assert snapshot(project, *CHECKOUT) == before  # not a byte of the checkout changed
    assert "no workspaces" in run(["llmops", "workspaces"], project).stdout
    lineage = run(["llmops", "registry", "show", "v1", "--json"], project).stdout
    assert f'"code_commit": "{head}"' in lineage  # the version records the commit it was built from


def test_a_failed_run_keeps_its_workspace_until_cleaned(committed):
    project = committed
    before = snapshot(project, *CHECKOUT)
    proc = run(["llmops", "run", "--no-push", "--commit", "HEAD", "-S", "gate.min_score=0.99"], project,
               check=False)
    assert proc.returncode == 1 and "gate failed" in proc.stderr and "workspace kept: " in proc.stderr
    kept = run(["llmops", "workspaces"], project).stdout.strip().splitlines()[1:]  # under the header row
    assert len(kept) == 1 and ".llmops/workspaces/" in kept[0]
    path = kept[0].split()[0]
    assert "min_score: 0.99" in (project / path / "params.yaml").read_text()  # its own params, as it failed
    assert snapshot(project, *CHECKOUT) == before
    assert run(["llmops", "workspaces", "clean"], project).stdout.startswith("removed ")
    assert "no workspaces" in run(["llmops", "workspaces"], project).stdout


def test_an_unknown_commit_is_one_clear_line(committed):
    proc = run(["llmops", "run", "--no-push", "--commit", "no-such-branch"], committed, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: --commit: commit 'no-such-branch': no such commit, branch or tag in ")
