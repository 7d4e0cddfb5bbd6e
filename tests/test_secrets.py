"""No secret reaches an output: the pipeline and the server run with sentinel secrets, then every output is scanned."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from conftest import base_env, free_port, run, set_params, stop_servers

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


def _git(project: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=project, capture_output=True, text=True, check=True).stdout


def _leaks(found: dict[str, bytes], secrets: list[str]) -> list[str]:
    return [f"{secret[:12]}... in {where}" for where, data in found.items() for secret in secrets
            if secret.encode() in data]


def test_no_secret_reaches_logs_manifests_artifacts_reports_or_prefect(ran_project, s3_endpoint, bucket):
    import boto3
    from openai import AuthenticationError, OpenAI

    project, port = ran_project, free_port()
    set_params(project, "storage.remote=s3", f"storage.bucket={bucket}", f"storage.endpoint_url={s3_endpoint}",
               "deploy.target=local", f"deploy.port={port}")
    run(["git", "commit", "-qam", "S3 remote, a local server"], project)
    env = base_env(**SENTINELS)
    wrong = "sk-llmops-sentinel-wrong-key-LEAK-0007"
    try:  # the finetune and everything after it train, evaluate, release, push and deploy with the sentinels set
        run(["llmops", "run", "-S", "train.finetune.steps=40"], project, env=env)
        key = (project / KEY_STORE).read_text().strip()
        api = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0)
        answer = api.chat.completions.create(model="model", max_tokens=4,
                                             messages=[{"role": "user", "content": "What is 2 + 2?"}])
        api.post("/feedback", cast_to=object, body={"request_id": answer.id, "rating": 2, "comment": "meh"})
        with pytest.raises(AuthenticationError):  # a caller's wrong key is not logged either
            OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=wrong, max_retries=0).models.list()
        run(["llmops", "registry", "list"], project, env=env)
    finally:
        stop_servers(project)
    secrets = [*SENTINELS.values(), key, wrong]

    # every file the run wrote: reports, manifests, metrics, dvc.lock, the DVC cache, the server's and DVC's logs,
    # the request log, the feedback database, the audit trail, and the Prefect database the UI reads
    # (the project's own sources, as committed, are inputs: this test file names the sentinels)
    inputs = set(_git(project, "ls-files").split()) - set(_git(project, "diff", "--name-only", "HEAD").split())
    files = {name: p.read_bytes() for p in project.rglob("*") if p.is_file()
             and ".git" not in p.relative_to(project).parts and (name := str(p.relative_to(project))) not in inputs
             and p.relative_to(project) != KEY_STORE}
    assert any(name.startswith(".llmops/prefect/") for name in files) and ".llmops/serve/server.log" in files
    # git's objects are compressed: read what they hold (commits, the registry's and the audit's tag messages)
    first = _git(project, "rev-list", "--max-parents=0", "HEAD").strip()  # the sources as committed: inputs
    history = subprocess.run(["git", "log", "--all", "-p", "--format=%H %an %ae %s%n%b", f"^{first}"], cwd=project,
                             capture_output=True, check=True).stdout
    assert b"llmops: model release" in history
    tags = subprocess.run(["git", "for-each-ref", "--format=%(refname) %(contents)", "refs/tags"], cwd=project,
                          capture_output=True, check=True).stdout
    assert b"audit/" in tags and b"model@" in tags
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    remote = {f"s3://{bucket}/{o['Key']}": s3.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
              for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket) for o in page.get("Contents", [])}
    assert any("/audit/" in name for name in remote) and any("/files/md5/" in name for name in remote)
    assert _leaks({**files, "git history": history, "git tags": tags, **remote}, secrets) == []
