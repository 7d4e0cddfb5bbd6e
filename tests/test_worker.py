"""The pipeline as a platform team runs it: `llmops setup` on a real Prefect server, a real process worker, runs
created through the API (what the UI's Run button does) and by the schedule."""

from __future__ import annotations

import subprocess
import time

import pytest

from conftest import BIN, base_env, run, snapshot
from llmops.config import load_params
from test_flow import _against

pytestmark = [pytest.mark.services, pytest.mark.training]


@pytest.fixture
def worker(ran_project, prefect_api):
    """The session's pipeline (dvc.lock and reports committed) set up on the Prefect server, with a process worker."""
    project = ran_project
    run(["git", "add", "dvc.lock", "reports"], project)
    run(["git", "commit", "-qm", "pipeline run"], project)
    api_url, home = prefect_api
    env = base_env(PREFECT_API_URL=api_url, PREFECT_HOME=str(home))
    out = run(["llmops", "setup"], project, env=env).stdout
    assert "work pool 'llmops' (process): ready" in out and "deployment 'build-model/nightly': registered" in out
    log = open(project.parent / "worker.log", "w")
    proc = subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", "llmops"], cwd=project.parent,
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield project, api_url
    finally:
        proc.terminate()
        proc.wait(60)


def _deployment(client):
    return client.read_deployment_by_name("build-model/nightly")


def test_a_run_created_through_the_api_runs_on_the_worker_in_its_own_workspace(worker):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    project, api_url = worker
    before = snapshot(project, "params.yaml", "dvc.lock", "models", "reports")
    params = load_params(project / "params.yaml").model_dump(mode="json")
    params["evaluate"]["max_new_tokens"] = 4  # one value changed in the form

    async def create():
        async with get_client() as client:
            deployment = await _deployment(client)
            flow_run = await client.create_flow_run_from_deployment(
                deployment.id, parameters={"params": params, "push": False, "commit": "HEAD"})
            return flow_run.id

    run_id = _against(api_url, create)

    async def state():
        async with get_client() as client:
            return (await client.read_flow_run(run_id)).state

    deadline = time.monotonic() + 900
    while not (now := _against(api_url, state)).is_final() and time.monotonic() < deadline:
        time.sleep(3)
    assert now.is_completed(), (now, (project.parent / "worker.log").read_text()[-3000:])

    async def artifacts():
        async with get_client() as client:
            found = await client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])))
            return {a.key for a in found}

    assert {"evaluate", "gate", "release", "register"} <= _against(api_url, artifacts)
    assert snapshot(project, "params.yaml", "dvc.lock", "models", "reports") == before  # it worked in a workspace
    assert "no workspaces" in run(["llmops", "workspaces"], project).stdout
    assert "v1.0.0" in run(["llmops", "registry", "list"], project).stdout


def test_the_schedule_makes_runs_and_the_form_is_typed_and_enforced(worker):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId, FlowRunFilter
    from prefect.client.schemas.filters import FlowRunFilterState, FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType

    _, api_url = worker

    async def read():
        async with get_client() as client:
            deployment = await _deployment(client)
            for _ in range(60):  # the server's scheduler service makes the runs of the coming days
                scheduled = await client.read_flow_runs(
                    deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])),
                    flow_run_filter=FlowRunFilter(state=FlowRunFilterState(
                        type=FlowRunFilterStateType(any_=[StateType.SCHEDULED]))))
                if scheduled:
                    break
                await __import__("asyncio").sleep(2)
            try:
                await client.create_flow_run_from_deployment(
                    deployment.id, parameters={"params": {"evaluate": {"max_new_tokens": 0}}})
                refused = None
            except Exception as exc:  # the API refuses it: what the form's validation says, server side
                refused = str(exc)
            return deployment, scheduled, refused

    deployment, scheduled, refused = _against(api_url, read)
    assert [s.schedule.cron for s in deployment.schedules] == ["0 2 * * *"]
    assert scheduled and all(r.expected_start_time.hour == 2 for r in scheduled)
    assert refused is not None and "max_new_tokens" in refused
    schema = deployment.parameter_openapi_schema
    assert schema["properties"]["push"]["type"] == "boolean" and schema["properties"]["commit"]
    data = schema["definitions"]["DataParams"]["properties"]
    assert data["num_examples"]["type"] == "integer" and data["eval_fraction"]["exclusiveMaximum"] == 1
    assert schema["definitions"]["StorageParams"]["properties"]["remote"]["enum"] == ["local", "s3"]
    assert "workspace of its own" in deployment.description
