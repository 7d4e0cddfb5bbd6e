"""The pipeline flow against a real Prefect server and a real S3-compatible server, both on 127.0.0.1."""

from __future__ import annotations

import asyncio
import hashlib
import json

import boto3
import pytest

from conftest import REPO, base_env, free_port, run, set_params, stop_servers
from llmops.core.config import load_params
from llmops.pipeline.stage import plan

STAGES = [s.dvc_name for s in plan(REPO)]

pytestmark = pytest.mark.services


def _client_query(api_url: str, flow_run_id: str | None = None):
    """Flow runs (newest first), and for one run its task runs and artifacts, read through the Prefect client."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.filters import FlowRunFilterDeploymentId
    from prefect.client.schemas.sorting import ArtifactSort, FlowRunSort, TaskRunSort

    async def query():
        async with get_client() as client:
            runs = await client.read_flow_runs(  # `llmops run`'s, not the scheduled runs of test_worker's deployments
                flow_run_filter=FlowRunFilter(deployment_id=FlowRunFilterDeploymentId(is_null_=True)),
                sort=FlowRunSort.START_TIME_DESC, limit=1)
            run_ = runs[0]
            flow = await client.read_flow(run_.flow_id)
            tasks = await client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_.id])), sort=TaskRunSort.EXPECTED_START_TIME_DESC, limit=50
            )
            artifacts = await client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_.id])), sort=ArtifactSort.ID_DESC, limit=50
            )
            return flow, run_, tasks, artifacts

    return _against(api_url, query)


def _against(api_url: str, query):
    """Run an async client query against the test server (never an ephemeral one)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        return asyncio.run(query())


def _env(api_url, home, s3_endpoint, bucket):
    return base_env(
        PREFECT_API_URL=api_url, PREFECT_HOME=str(home),
        LLMOPS_S3_BUCKET=bucket, LLMOPS_S3_ENDPOINT_URL=s3_endpoint, LLMOPS_S3_PREFIX="pipeline",
    )


@pytest.mark.training
def test_flow_runs_on_the_server_and_pushes_to_s3(ran_project, prefect_api, s3_endpoint, bucket):
    """A run with one changed value on the session's run pipeline: fine-tuning and evaluation rerun, the rest is reused;
    the release is registered, deployed to a local server, and answers the official openai client."""
    project = ran_project
    api_url, home = prefect_api
    port = free_port()
    set_params(project, "deploy.target=local", f"deploy.port={port}")
    run(["git", "commit", "-qam", "deploy to a local server"], project)
    try:
        proc = run(["llmops", "run", "-S", "train.finetune.steps=61"], project,
                   env=_env(api_url, home, s3_endpoint, bucket))
        _check_the_run(project, proc, api_url, s3_endpoint, bucket)
        _check_the_endpoint(project, proc, port)
    finally:
        stop_servers(project)


def _check_the_endpoint(project, proc, port):
    from openai import AuthenticationError, BadRequestError, OpenAI

    url = f"http://127.0.0.1:{port}/v1"
    assert f"Deployed model v1.0.0 to production, served at {url}" in proc.stdout
    assert "curl " in proc.stdout and "from openai import OpenAI" in proc.stdout
    status = run(["llmops", "serve", "status"], project).stdout
    assert url in status and "model v1.0.0, follows production" in status
    assert f"served at {url}" in run(["llmops", "registry", "lineage", "production"], project).stdout

    client = OpenAI(base_url=url, api_key=(project / ".llmops/serve/api_key").read_text().strip(), max_retries=0)
    assert [m.id for m in client.models.list().data] == ["model"]
    chat = client.chat.completions.create(model="model", messages=[{"role": "user", "content": "What is 1 + 1?"}],
                                          max_tokens=4, temperature=0)
    assert chat.model == "model@v1.0.0" and chat.choices[0].finish_reason in ("stop", "length")
    completion = client.completions.create(model="model@v1.0.0", prompt="The", max_tokens=4, temperature=0)
    assert completion.usage.completion_tokens >= 1
    chunks = list(client.chat.completions.create(model="model", messages=[{"role": "user", "content": "Hi"}],
                                                 max_tokens=5, stream=True, extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) and chunks[-1].choices[0].finish_reason == "length"
    with pytest.raises(BadRequestError) as bad:
        client.chat.completions.create(model="model", messages=[{"role": "user", "content": "x"}], temperature=7)
    assert bad.value.body["param"] == "temperature"
    with pytest.raises(AuthenticationError):
        OpenAI(base_url=url, api_key="sk-wrong", max_retries=0).models.list()


def _check_the_run(project, proc, api_url, s3_endpoint, bucket):
    out = proc.stdout + proc.stderr
    assert "Pipeline completed" in proc.stdout and f"s3://{bucket}/pipeline" in proc.stdout

    flow, flow_run, task_runs, artifacts = _client_query(api_url)
    assert flow.name == "build-model"
    assert flow_run.state.is_completed()
    assert sorted((t.name.rsplit("-", 1)[0], t.state.type.value) for t in task_runs) == sorted(
        (name, "COMPLETED") for name in STAGES + ["push", "register", "deploy"])
    by_key = {a.key: a for a in artifacts}
    assert set(by_key) == {"prepare-data", "validate-data", "train-pretrain", "train-finetune", "evaluate",
                           "audit-bias", "quantize", "gate", "release", "push", "register", "deploy"}
    assert "PASSED" in by_key["gate"].description
    assert {row["method"].split()[0] for row in json.loads(by_key["quantize"].data)} == {
        "none", "int8_weight_only", "nf4"}
    assert json.loads(by_key["audit-bias"].data)[0]["bias_type"] == "all"
    curve = json.loads(by_key["train-pretrain"].data)
    assert curve[0]["step"] == "1" and float(curve[-1]["loss"]) < float(curve[0]["loss"])
    assert json.loads(by_key["train-finetune"].data)[-1]["step"] == "61"
    scores = {row["metric"]: row for row in json.loads(by_key["evaluate"].data)}
    assert scores["perplexity"]["finetuned"] < scores["perplexity"]["base"]
    assert "exact match" in proc.stdout and "perplexity" in proc.stdout
    assert "# Data validation PASSED" in by_key["validate-data"].data
    table = json.loads(by_key["prepare-data"].data)
    assert {row["file"] for row in table} >= {"data/prepared/train.jsonl", "data/prepared/eval.jsonl"}

    keys = {
        obj["Key"]
        for page in boto3.client("s3", endpoint_url=s3_endpoint).get_paginator("list_objects_v2").paginate(Bucket=bucket)
        for obj in page.get("Contents", [])
    }
    lock = (project / "dvc.lock").read_text()
    digest = hashlib.md5((project / "data/prepared/train.jsonl").read_bytes()).hexdigest()
    assert f"pipeline/files/md5/{digest[:2]}/{digest[2:]}" in keys
    assert "data/prepared" in lock and "models/finetune" in lock
    digest = hashlib.md5((project / "models/pretrain/model.safetensors").read_bytes()).hexdigest()
    assert f"pipeline/files/md5/{digest[:2]}/{digest[2:]}" in keys  # the checkpoint is versioned too

    # the stages' own output (training progress) is in the run's log, as it is on the console
    logs = _logs(api_url, flow_run.id)
    assert "train@finetune: step 61/61" in logs and "eval_loss" in logs and "ETA" in logs
    assert "train@finetune: step 61/61" in out
    # what changed, what was reused, and how the result moved against the previous run
    assert "params.yaml: train.finetune.steps: 60 -> 61 for this run" in out
    for stage in ("prepare_data", "validate_data", "train@pretrain"):
        assert f"{stage}: unchanged since the last run" in out and f"{stage}: unchanged" in logs
    for stage in ("train@finetune", "evaluate", "audit_bias", "quantize", "gate", "release"):
        assert f"{stage}: unchanged" not in out
    assert "(previous run: " in proc.stdout and "Release gate: passed all 14 checks" in proc.stdout  # 8, one per bias type
    diff = [line for line in run(["git", "diff", "-U0", "params.yaml"], project).stdout.splitlines()
            if line.startswith(("+ ", "- "))]
    assert [line.split("#")[0].strip() for line in diff] == ["-    steps: 60", "+    steps: 61"]


def _logs(api_url: str, flow_run_id) -> str:
    """Every log line of a flow run and its task runs, as the UI shows them."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    async def query():
        async with get_client() as client:
            logs = await client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])),
                                          limit=200)
            offset = len(logs)
            while True:
                more = await client.read_logs(
                    log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])), limit=200, offset=offset)
                if not more:
                    return logs
                logs += more
                offset += len(more)

    return "\n".join(log.message for log in _against(api_url, query))


@pytest.mark.training
def test_a_refused_release_fails_the_flow_with_the_failing_checks_and_pushes_nothing(
        ran_project, prefect_api, s3_endpoint, bucket):
    api_url, home = prefect_api
    proc = run(["llmops", "run", "-S", "gate.max_perplexity=1.5"], ran_project,
               env=_env(api_url, home, s3_endpoint, bucket), check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "gate failed: 1 of 14 release checks failed:" in proc.stderr and "gate.max_perplexity: " in proc.stderr

    _, flow_run, task_runs, artifacts = _client_query(api_url)
    assert flow_run.state.is_failed() and "gate.max_perplexity" in flow_run.state.message
    states = {t.name.rsplit("-", 1)[0]: t.state.type.value for t in task_runs}
    assert states["gate"] == "FAILED" and "push" not in states
    assert "FAIL" in {a.key: a for a in artifacts}["gate"].data
    assert _pushed(s3_endpoint, bucket) == []
    assert load_params(ran_project / "params.yaml").gate.max_perplexity == 1e9  # params.yaml put back


@pytest.mark.training
def test_a_crashing_stage_shows_its_traceback_in_the_run_log(ran_project, prefect_api, s3_endpoint, bucket):
    """An unexpected crash (here: the gate's command replaced by one that raises) is visible in the UI, traceback and all."""
    dvc_yaml = ran_project / "dvc.yaml"
    dvc_yaml.write_text(dvc_yaml.read_text().replace(
        "cmd: llmops gate", "cmd: python -c \"import json; json.loads('{broken')\""))
    run(["git", "commit", "-qam", "a gate that crashes"], ran_project)
    api_url, home = prefect_api
    proc = run(["llmops", "run", "--no-push"], ran_project, env=_env(api_url, home, s3_endpoint, bucket), check=False)
    assert proc.returncode == 1 and "gate failed" in proc.stderr

    _, flow_run, task_runs, _ = _client_query(api_url)
    assert flow_run.state.is_failed() and "gate failed" in flow_run.state.message
    logs = _logs(api_url, flow_run.id)
    assert "Traceback (most recent call last)" in logs and "json.decoder.JSONDecodeError" in logs


def test_failing_validation_fails_the_flow_with_the_reason_and_pushes_nothing(project, tmp_path, prefect_api, s3_endpoint, bucket):
    api_url, home = prefect_api
    rows = [{"prompt": f"What is {i} + 1?", "response": str(i + 1)} for i in range(40)]
    rows[5]["response"] = "Ask 555-867-5309 or jenny@example.com"
    data = tmp_path / "mine.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = run(
        ["llmops", "run", "-S", f"data.instructions={data}", "-S", "governance.data_licence=MIT"], project,
        env=_env(api_url, home, s3_endpoint, bucket), check=False,
    )
    assert proc.returncode == 1
    assert "response_no_email" in proc.stderr and "response_no_phone" in proc.stderr

    _, flow_run, task_runs, artifacts = _client_query(api_url)
    assert flow_run.state.is_failed()
    assert "validate_data failed" in flow_run.state.message and "response_no_email" in flow_run.state.message
    assert "jenny@example.com" not in flow_run.state.message  # PII masked in the reason
    states = {t.name.rsplit("-", 1)[0]: t.state.type.value for t in task_runs}
    assert states == {"inputs": "COMPLETED", "prepare_data": "COMPLETED", "validate_data": "FAILED"}  # no push
    assert "FAIL" in {a.key: a for a in artifacts}["validate-data"].data
    assert _pushed(s3_endpoint, bucket) == []


def _pushed(s3_endpoint: str, bucket: str) -> list[str]:
    """What DVC pushed to the bucket (the audit trail beside it records the run's stages either way)."""
    listed = boto3.client("s3", endpoint_url=s3_endpoint).list_objects_v2(Bucket=bucket).get("Contents", [])
    return [o["Key"] for o in listed if "audit" not in o["Key"].split("/")[:-1]]


@pytest.mark.services
def test_a_new_project_starts_its_prefect_server_on_a_migrated_copy(tmp_path, monkeypatch):
    """A project's first run migrates its new Prefect database once for the machine: the next new one starts on a
    copy, which the API works on as on a database it migrated itself."""
    import sqlite3
    import urllib.request

    from llmops.pipeline import prefect_api

    monkeypatch.setattr(prefect_api, "TEMPLATES", tmp_path / "templates")
    tables = {}
    for name in ("first", "second"):
        for var in ("PREFECT_API_URL", "PREFECT_HOME", "PREFECT_API_DATABASE_CONNECTION_URL"):
            monkeypatch.delenv(var, raising=False)
        copied = bool(list((tmp_path / "templates").glob("prefect-*.db")))
        assert copied == (name == "second")
        with prefect_api.prefect_api(tmp_path / name) as url:
            created = urllib.request.urlopen(urllib.request.Request(
                f"{url}/flows/", data=json.dumps({"name": f"flow-{name}"}).encode(),
                headers={"Content-Type": "application/json"}))
            assert created.status in (200, 201)
        db = tmp_path / name / ".llmops/prefect/prefect.db"
        with sqlite3.connect(db) as conn:
            tables[name] = {row[0] for row in conn.execute("select name from sqlite_master where type='table'")}
            flows = [row[0] for row in conn.execute("select name from flow")]
        assert flows == [f"flow-{name}"]  # the copy holds none of the first project's runs
    assert "alembic_version" in tables["first"] and tables["first"] == tables["second"]
