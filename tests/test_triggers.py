"""Git-push retraining and approval answers, where they must refuse: which pushes retrain, a hook that cannot reach
its server (the push still lands, the pusher is told), hooks that are not ours, and answers the server cannot take.
The runs a push starts are in test_worker.py."""

from __future__ import annotations

import pytest

from conftest import base_env, run
from llmops.pipeline.triggers import watched

DEAD_API = "http://127.0.0.1:9/api"  # the discard port: nothing answers


def test_only_what_the_pipeline_builds_from_retrains():
    assert watched(["params.yaml", "dvc.yaml", "data/corpus.txt.dvc", "README.md", "tests/test_a.py",
                    "configs/params.yaml", "llmops/cli/main.py"]) == ["params.yaml", "dvc.yaml", "data/corpus.txt.dvc"]


@pytest.fixture
def shared(tmp_path):
    """A bare repository people push to, and a clone of it with one commit."""
    bare, dev = tmp_path / "shared.git", tmp_path / "dev"
    run(["git", "init", "-q", "--bare", "-b", "main", str(bare)], tmp_path)
    run(["git", "clone", "-q", str(bare), str(dev)], tmp_path)
    (dev / "params.yaml").write_text("data:\n  num_examples: 400\n")
    (dev / "README.md").write_text("# project\n")
    run(["git", "add", "-A"], dev)
    run(["git", "commit", "-qm", "start"], dev)
    run(["git", "push", "-q", "origin", "main"], dev)
    return bare, dev


def test_a_hook_that_cannot_reach_its_server_lets_the_push_land_and_says_so(shared):
    bare, dev = shared
    run(["llmops", "install-hook", str(bare)], dev, env=base_env(PREFECT_API_URL=DEAD_API))
    (dev / "params.yaml").write_text("data:\n  num_examples: 500\n")
    run(["git", "commit", "-qam", "more examples"], dev)
    sha = run(["git", "rev-parse", "HEAD"], dev).stdout.strip()
    push = run(["git", "push", "origin", "main"], dev)  # post-receive cannot refuse a push: it lands
    assert f"no run of 'build-model/on-push' started for {sha[:12]} (refs/heads/main)" in push.stderr
    assert DEAD_API in push.stderr
    assert run(["git", "rev-parse", "main"], bare).stdout.strip() == sha
    # another branch, or a push of docs only, asks nothing of the server
    (dev / "README.md").write_text("# project\nmore\n")
    run(["git", "commit", "-qam", "docs"], dev)
    docs = run(["git", "push", "origin", "main"], dev).stderr
    assert "no retraining for" in docs and "no run" not in docs
    run(["git", "checkout", "-qb", "feature"], dev)
    (dev / "params.yaml").write_text("data:\n  num_examples: 600\n")
    run(["git", "commit", "-qam", "on a branch"], dev)
    assert "llmops" not in run(["git", "push", "origin", "feature"], dev).stderr


def test_install_hook_refuses_what_it_cannot_do(shared, tmp_path):
    bare, dev = shared
    no_api = base_env()
    no_api.pop("PREFECT_API_URL", None)
    out = run(["llmops", "install-hook", str(bare)], dev, env=no_api, check=False)
    assert out.returncode == 1 and "PREFECT_API_URL is not set" in out.stderr
    env = base_env(PREFECT_API_URL=DEAD_API)
    (tmp_path / "plain").mkdir()
    out = run(["llmops", "install-hook", str(tmp_path / "plain")], dev, env=env, check=False)
    assert out.returncode == 1 and "not a git repository" in out.stderr
    out = run(["llmops", "install-hook", str(tmp_path / "missing")], dev, env=env, check=False)
    assert out.returncode == 1 and "missing: not a git repository" in out.stderr
    theirs = bare / "hooks" / "post-receive"
    theirs.write_text("#!/bin/sh\necho deploy the website\n")
    out = run(["llmops", "install-hook", str(bare)], dev, env=env, check=False)
    assert out.returncode == 1 and "exists and is not llmops's; pass --force" in out.stderr
    assert "deploy the website" in theirs.read_text()  # left as it was
    run(["llmops", "install-hook", str(bare), "--force"], dev, env=env)
    assert "llmops.pipeline.triggers" in theirs.read_text()


@pytest.mark.services
def test_answers_the_server_cannot_take_are_refused(prefect_api, tmp_path):
    api_url, _ = prefect_api
    out = run(["llmops", "approve", "no-such-run", "--reason", "fine"], tmp_path,
              env=base_env(PREFECT_API_URL=api_url), check=False)
    assert out.returncode == 1 and "flow run 'no-such-run': no such run" in out.stderr
    out = run(["llmops", "reject", "no-such-run", "--reason", ""], tmp_path,
              env=base_env(PREFECT_API_URL=api_url), check=False)
    assert out.returncode == 2 and "reason" in out.stderr
    out = run(["llmops", "approve", "some-run", "--reason", "fine"], tmp_path,
              env=base_env(PREFECT_API_URL=DEAD_API), check=False)
    assert out.returncode == 1 and "cannot be reached" in out.stderr and "nothing was changed" in out.stderr
