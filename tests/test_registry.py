"""The model registry: versions and stages as git tags at a shared origin, files from S3, history that is never lost."""

from __future__ import annotations

import filecmp
import json
import shutil
import subprocess
from pathlib import Path

import boto3
import pytest

from conftest import BIN, base_env, run, set_params

pytestmark = [pytest.mark.services, pytest.mark.training]


def llmops(cwd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run([str(BIN / "llmops"), "registry", *args], cwd, check=check)


@pytest.fixture(scope="module")
def origin(pipeline, tmp_path_factory, s3_endpoint) -> Path:
    """A bare git origin holding two registered versions (v1: int8 release, v2: nf4 release), their files on S3."""
    tmp = tmp_path_factory.mktemp("registry")
    work = tmp / "work"
    shutil.copytree(pipeline, work, symlinks=True)
    env = base_env()  # a module fixture runs before the per-test fake AWS credentials are set
    boto3.client("s3", endpoint_url=s3_endpoint, aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                 aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name=env["AWS_DEFAULT_REGION"],
                 ).create_bucket(Bucket="registry")
    run(["dvc", "remote", "add", "--force", "--default", "storage", "s3://registry/dvc"], work)
    run(["dvc", "remote", "modify", "storage", "endpointurl", s3_endpoint], work)
    set_params(work, "registry.git_remote=origin")  # the team's shared registry: every clone reads and writes it
    run(["git", "commit", "-qam", "a run, its remote, and the registry's"], work)
    run(["git", "init", "-q", "--bare", "-b", "main", str(tmp / "origin.git")], tmp)
    run(["git", "remote", "add", "origin", str(tmp / "origin.git")], work)
    run(["git", "push", "-q", "origin", "main"], work)

    run(["dvc", "push"], work)
    assert llmops(work, "register", "--why", "the first release").stdout.strip() == "registered model v1.0.0"
    assert "unchanged: this release is already v1.0.0" in llmops(work, "register").stdout  # same files: same version
    set_params(work, "gate.release_candidate=nf4")
    run(["dvc", "repro", "release"], work)
    run(["dvc", "push"], work)
    assert llmops(work, "register", "--why", "nf4 is smaller").stdout.strip() == "registered model v2.0.0"
    return tmp / "origin.git"


def clone(origin: Path, dest: Path) -> Path:
    """A fresh clone of the test's own copy of the origin (each test changes its own)."""
    mine = dest.parent / "origin.git"
    if not mine.exists():
        shutil.copytree(origin, mine)
    run(["git", "clone", "-q", str(mine), str(dest)], dest.parent)
    return dest


def production_rev(repo: Path) -> str:
    """What DVC resolves `model --stage production` to (the commit `dvc artifacts get` downloads from)."""
    import dvc.api

    return dvc.api.artifacts_show("model", stage="production", repo=str(repo))["rev"]


def test_promote_and_rollback_keep_the_whole_history_and_agree_with_dvc(origin, tmp_path):
    repo = clone(origin, tmp_path / "clone")
    listed = llmops(repo, "list").stdout.splitlines()[1:]  # under the header row
    assert [line.split()[0] for line in listed] == ["v2.0.0", "v1.0.0"]  # the tags came with the clone
    assert "quantized/nf4" in listed[0] and "quantized/int8_weight_only" in listed[1]

    assert llmops(repo, "promote", "v1", "--to", "production", "--why", "first ship").stdout.strip() == \
        "production: none -> v1.0.0"
    assert llmops(repo, "promote", "2", "--to", "production", "--why", "smaller").stdout.strip() == \
        "production: v1.0.0 -> v2.0.0"
    v2 = json.loads(llmops(repo, "show", "production", "--json").stdout)
    assert v2["version"] == "v2.0.0" and production_rev(repo) == v2["commit"]
    assert v2["lineage"]["gate"]["passed"] and v2["lineage"]["parent_version"] is None  # nothing was in production

    out = llmops(repo, "rollback", "--why", "latency regression").stdout.strip()
    assert out == "production: rolled back v2.0.0 -> v1.0.0"
    v1 = json.loads(llmops(repo, "show", "production", "--json").stdout)
    assert v1["version"] == "v1.0.0" and production_rev(repo) == v1["commit"]

    events = [line.split()[2:5] for line in llmops(repo, "history", "--stage", "production").stdout.splitlines()[1:]]
    assert events == [["assignment", "v1.0.0", "production"], ["unassignment", "v1.0.0", "production"],
                      ["assignment", "v2.0.0", "production"], ["unassignment", "v2.0.0", "production"],
                      ["assignment", "v1.0.0", "production"]]
    last = llmops(repo, "history").stdout.splitlines()[-1]
    assert "rollback from v2.0.0: latency regression" in last

    # the changes are at the origin: another fresh clone sees the same registry
    other = clone(origin, tmp_path / "other")
    assert json.loads(llmops(other, "show", "production", "--json").stdout)["version"] == "v1.0.0"
    lineage = llmops(other, "lineage", "v1").stdout
    for expected in ("prepare_data     -> data/prepared (md5 ", "train@pretrain   -> models/pretrain (md5 ",
                     "release          -> models/release (md5 ", "gate passed 14/14", "holds now: production",
                     "assignment production", "by "):
        assert expected in lineage, lineage


def test_a_fresh_clone_pulls_the_production_model_from_s3_byte_identical(origin, tmp_path):
    repo = clone(origin, tmp_path / "clone")
    llmops(repo, "promote", "v2", "--to", "production", "--why", "ship")
    fresh = clone(origin, tmp_path / "fresh")
    assert not (fresh / "models").exists()
    assert llmops(fresh, "pull", "production", "-o", "served").stdout.strip() == "v2.0.0 -> served/"
    work = origin.parent / "work"  # where v2 was made: its models/release is v2's
    files = sorted(f.relative_to(work / "models/release") for f in (work / "models/release").rglob("*") if f.is_file())
    assert files == sorted(f.relative_to(fresh / "served") for f in (fresh / "served").rglob("*") if f.is_file())
    assert any(f.parts[0] == "adapter" for f in files)
    for f in files:
        assert filecmp.cmp(work / "models/release" / f, fresh / "served" / f, shallow=False), f


def test_racing_promotions_from_two_clones_lose_nothing(origin, tmp_path):
    a, b = clone(origin, tmp_path / "a"), clone(origin, tmp_path / "b")
    jobs = [(a, "v1", "production"), (a, "v2", "staging"), (b, "v2", "production")]
    procs = [subprocess.Popen([str(BIN / "llmops"), "registry", "promote", version, "--to", stage, "--why", "race"],
                              cwd=repo, env=base_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for repo, version, stage in jobs]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], results

    judge = clone(origin, tmp_path / "judge")
    history = llmops(judge, "history").stdout.splitlines()
    assigned = sorted(tuple(line.split()[3:5]) for line in history if line.split()[2] == "assignment")
    assert assigned == sorted([("v1.0.0", "production"), ("v2.0.0", "staging"), ("v2.0.0", "production")])
    listed = {line.split()[0]: line.split()[1] for line in llmops(judge, "list").stdout.splitlines()[1:]}
    assert sorted(listed.values()) in (["-", "production,staging"], ["production", "staging"])  # one holder per stage
    holder = json.loads(llmops(judge, "show", "production", "--json").stdout)["version"]
    assert production_rev(judge) == json.loads(llmops(judge, "show", holder, "--json").stdout)["commit"]


def test_bad_requests_are_one_clear_line_and_change_nothing(origin, tmp_path):
    repo = clone(origin, tmp_path / "clone")
    tags = run(["git", "tag", "-l", "model*"], repo).stdout
    cases = [
        (["promote", "v9", "--to", "production", "--why", "x"], "no model version 'v9.0.0' in the registry (registered: "
                                                                 "v2.0.0, v1.0.0)"),
        (["promote", "latest", "--to", "production", "--why", "x"], "'latest' is not a model version (like v3 or v3.0.0)"),
        (["rollback", "--why", "x"], "no version holds production; nothing to roll back"),
        (["pull", "staging"], "no version holds staging"),
    ]
    for args, message in cases:
        proc = llmops(repo, *args, check=False)
        assert proc.returncode == 1 and proc.stderr.strip() == f"error: registry: {message}", proc.stderr
    llmops(repo, "promote", "v1", "--to", "production", "--why", "first")
    proc = llmops(repo, "rollback", "--why", "x", check=False)
    assert "v1.0.0 is the only version that ever held production" in proc.stderr
    proc = llmops(repo, "promote", "v1", "--to", "production", "--why", "again", check=False)
    assert proc.stderr.strip() == "error: registry: v1.0.0 already holds production"

    tags = run(["git", "tag", "-l", "model*"], repo).stdout
    run(["git", "remote", "set-url", "origin", str(tmp_path / "gone.git")], repo)  # the registry's remote is unreachable
    proc = llmops(repo, "promote", "v2", "--to", "production", "--why", "x", check=False)
    assert proc.returncode == 1 and "registry remote 'origin'" in proc.stderr and "nothing was changed" in proc.stderr
    # no registry tag left behind (the audit trail records the failed attempt)
    assert "Traceback" not in proc.stderr and run(["git", "tag", "-l", "model*"], repo).stdout == tags


def test_registry_tags_made_by_hand_are_named_and_refused(origin, tmp_path):
    """A hand-made `model#production#99` once moved production with no audit record, a forged version tag was listed
    and promoted, and a second version tag on one commit crashed `registry list`."""
    repo = clone(origin, tmp_path / "clone")
    llmops(repo, "promote", "v1", "--to", "production", "--why", "first")
    assert run([str(BIN / "llmops"), "trail", "verify"], repo).returncode == 0
    v1, v2 = (json.loads(llmops(repo, "show", v, "--json").stdout)["commit"] for v in ("v1", "v2"))
    run(["git", "tag", "-a", "model#production#99", v2, "-m", json.dumps({"by": "mallory", "why": "x"})], repo)
    verify = run([str(BIN / "llmops"), "trail", "verify"], repo, check=False)
    assert verify.returncode == 3 and "registry tag model#production#99 was made outside llmops" in verify.stderr
    from llmops.governance.apikeys import hash_key
    served = run([str(BIN / "llmops"), "serve", "start", "--port", "1"], repo, check=False,
                 env=base_env(LLMOPS_API_KEY_HASHES=hash_key("sk-x")))
    assert served.returncode == 1 and "the registry holds tags made outside llmops (model#production#99" \
        in served.stderr, served.stderr
    run(["git", "tag", "-d", "model#production#99"], repo)

    run(["git", "tag", "-a", "model@v3.0.0", v2 + "^", "-m", json.dumps({"lineage": {"gate": {"passed": True}}})],
        repo)
    forged = llmops(repo, "promote", "v3", "--to", "staging", "--why", "x", check=False)
    assert forged.returncode == 1 and "v3.0.0 was registered outside llmops" in forged.stderr, forged.stderr
    run(["git", "tag", "-d", "model@v3.0.0"], repo)

    run(["git", "tag", "-a", "model@v9.0.0", v1, "-m", "{}"], repo)  # a second version tag on v1's commit
    listed = llmops(repo, "list", check=False)
    assert listed.returncode == 1 and "Traceback" not in listed.stderr and "model@v9.0.0" in listed.stderr, \
        listed.stderr
