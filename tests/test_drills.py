"""Privacy drills over one pipeline run (S3 remote, a local server): no secret reaches any output, and a GDPR erasure
leaves nothing of a planted data subject in the remote, the DVC cache, the data or the logs."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from conftest import base_env, free_port, run, set_params, stop_servers
from llmops.governance import audit

pytestmark = [pytest.mark.services, pytest.mark.training]

# what a team's environment holds while the pipeline runs: cloud credentials (used: the DVC remote is S3), tokens
SENTINELS = {
    "AWS_ACCESS_KEY_ID": "AKIASENTINELLEAK0001",
    "AWS_SECRET_ACCESS_KEY": "sentinel-aws-secret-LEAK-0002",
    "AWS_SESSION_TOKEN": "sentinel-aws-session-LEAK-0003",
    "HF_TOKEN": "hf_sentinelLEAK0004",
    "OPENAI_API_KEY": "sk-sentinel-LEAK-0005",
    "PREFECT_API_KEY": "pnu_sentinelLEAK0006",
}
KEY_STORE = Path(".llmops/serve/api_key")  # where the deploy key is kept (0600), like ~/.aws/credentials
SUBJECT = "Zebulon " + "Quartzfield"  # built here, so this file (which the project's git history holds) never names it


def _git(project: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=project, capture_output=True, text=True, check=True).stdout


def _leaks(found: dict[str, bytes], secrets: list[str]) -> list[str]:
    return [f"{secret[:12]}... in {where}" for where, data in found.items() for secret in secrets
            if secret.lower().encode() in data.lower()]


def _bucket(s3_endpoint: str, bucket: str) -> dict[str, bytes]:
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    return {f"s3://{bucket}/{o['Key']}": s3.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
            for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket) for o in page.get("Contents", [])}


def _files(top: Path, skip: set[str] = frozenset()) -> dict[str, bytes]:
    return {name: p.read_bytes() for p in top.rglob("*") if p.is_file() and ".git" not in p.relative_to(top).parts
            and (name := str(p.relative_to(top))) not in skip}


def test_no_secret_in_any_output_and_an_erased_subject_leaves_no_trace(ran_project, s3_endpoint, bucket):
    from openai import AuthenticationError, OpenAI

    project, port = ran_project, free_port()
    # the subject in production feedback that was accepted as training data (a dvc-added input, as the monitor does)
    planted = project / "data/corrections/planted.jsonl"
    planted.parent.mkdir(parents=True, exist_ok=True)
    planted.write_text("".join(json.dumps({"prompt": f"Who is {SUBJECT} number {i}?", "response": f"{SUBJECT} {i}",
                                           "task": "correction"}) + "\n" for i in range(3)))
    run(["dvc", "add", "--quiet", "data/corrections/planted.jsonl"], project)
    set_params(project, "storage.remote=s3", f"storage.bucket={bucket}", f"storage.endpoint_url={s3_endpoint}",
               "deploy.target=local", f"deploy.port={port}", "data.corrections=data/corrections/planted.jsonl")
    run(["git", "add", "-A", "params.yaml", "data/corrections"], project)
    run(["git", "commit", "-qm", "S3 remote, a local server, corrections"], project)
    env = base_env(**SENTINELS)
    wrong = "sk-llmops-sentinel-wrong-key-LEAK-0007"
    try:  # data onwards (the corpus is unchanged: pretraining is not) runs, pushes and deploys with the sentinels set
        ran = run(["llmops", "run"], project, env=env)
        out = ran.stdout + ran.stderr
        # new instruction rows, the same corpus: the adapter trains again on the same pretrained base
        assert "train@pretrain: unchanged since the last run" in out and "train@finetune: unchanged" not in out
        key = (project / KEY_STORE).read_text().strip()
        api = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0)
        answer = api.chat.completions.create(model="model", max_tokens=4,
                                             messages=[{"role": "user", "content": f"Tell me about {SUBJECT}"}])
        api.chat.completions.create(model="model", max_tokens=4, messages=[{"role": "user", "content": "2 + 2?"}])
        api.post("/feedback", cast_to=object, body={"request_id": answer.id, "rating": 2, "comment": SUBJECT})
        with pytest.raises(AuthenticationError):  # a caller's wrong key is not logged either
            OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=wrong, max_retries=0).models.list()
        run(["llmops", "registry", "list"], project, env=env)

        def cached() -> str:  # a greedy answer about the subject, kept in the server's response cache
            return api.chat.completions.with_raw_response.create(
                model="model", max_tokens=4, temperature=0,
                messages=[{"role": "user", "content": f"Who is {SUBJECT}?"}]).headers["x-llmops-cache"]

        assert (cached(), cached()) == ("miss", "hit")
        _no_secret_and_an_erasure_that_leaves_no_trace(project, s3_endpoint, bucket, env, key, wrong)
        assert cached() == "miss"  # the erasure reloaded the server: its cache is empty
    finally:
        stop_servers(project)


def _no_secret_and_an_erasure_that_leaves_no_trace(project: Path, s3_endpoint: str, bucket: str, env: dict,
                                                    key: str, wrong: str) -> None:
    # 1. no secret: every file the run wrote (reports, manifests, metrics, dvc.lock, the DVC cache, the server's and
    # DVC's logs, the request log, the feedback database, the audit trail, the Prefect database the UI reads), git's
    # history and tag messages (the registry's, the audit's), and every object in the bucket
    secrets = [*SENTINELS.values(), key, wrong]
    inputs = set(_git(project, "ls-files").split()) - set(_git(project, "diff", "--name-only", "HEAD").split())
    files = _files(project, inputs | {str(KEY_STORE)})  # the sources as committed are inputs: this file names them
    assert any(name.startswith(".llmops/prefect/") for name in files) and ".llmops/serve/server.log" in files
    first = _git(project, "rev-list", "--max-parents=0", "HEAD").strip()
    history = subprocess.run(["git", "log", "--all", "-p", "--format=%H %an %ae %s%n%b", f"^{first}"], cwd=project,
                             capture_output=True, check=True).stdout
    tags = subprocess.run(["git", "for-each-ref", "--format=%(refname) %(contents)", "refs/tags"], cwd=project,
                          capture_output=True, check=True).stdout
    assert b"llmops: model release" in history and b"audit/" in tags and b"model@" in tags
    remote = _bucket(s3_endpoint, bucket)
    assert any("/audit/" in name for name in remote) and any("/files/md5/" in name for name in remote)
    assert _leaks({**files, "git history": history, "git tags": tags, **remote}, secrets) == []

    # 2. the erasure drill: the subject is in the data, its stored versions, the request log and the feedback
    before = {**_files(project / "data"), **_files(project / ".dvc/cache"), **remote,
              **_files(project / ".llmops/serve")}
    assert len(_leaks(before, [SUBJECT])) >= 5
    erased = run(["llmops", "erase", "--subject", SUBJECT.lower()], project, env=env).stdout
    assert "model versions trained on affected data: v1.0.0" in erased, erased
    assert "new dataset version: commit" in erased and "3 rows removed from the current inputs" in erased
    assert "verified: no copy left" in erased and "1 running servers reloaded" in erased
    # (the erasure's own scan read all of it; this reads it again, Prefect's database included)
    after = {**_files(project / "data"), **_files(project / "reports"), **_files(project / ".dvc/cache"),
             **_bucket(s3_endpoint, bucket), **_files(project / ".llmops")}
    assert _leaks(after, [SUBJECT]) == []
    # every correction was the subject's: the data has none now, and the checkout says so
    assert not (project / "data/corrections/planted.jsonl").exists()
    assert "corrections: null" in (project / "params.yaml").read_text()
    assert _git(project, "status", "--porcelain", "--", "dvc.lock", "data").strip() == ""  # committed
    record = [r for r in audit.records(project) if r.action == "data.erase"][-1]
    assert record.outcome == "ok" and record.detail["versions"] == ["v1.0.0"]
    assert SUBJECT.lower() not in json.dumps(record.__dict__).lower()  # its sha256 only
    again = run(["llmops", "erase", "--subject", SUBJECT], project, env=env, check=False)
    assert again.returncode == 1 and "nothing in the datasets" in again.stderr and "nothing was changed" in again.stderr
