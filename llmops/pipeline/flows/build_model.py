"""The pipeline flow: every stage of dvc.yaml in its DAG order, then push, register the release and deploy it.

Prefect decides when and whether; DVC (dvc.yaml) says what each stage does and
skips stages whose inputs did not change. Every run builds in a workspace of its
own (llmops/pipeline/workspaces.py); a run of the checkout lands its outputs, dvc.lock and
params.yaml there once its model is registered, so a run that fails changes
nothing in the checkout. A stage that fails stops the run with its reason;
nothing after it runs and nothing is pushed. The build holds a global
concurrency limit (one run trains at a time), and with deploy.require_approval
the run pauses for a reviewer before production.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from prefect import State, flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.states import Cancelled, Failed
from pydantic import BaseModel

from llmops.core import locks
from llmops.core.config import (
    PARAMS_FILE,
    DeployParams,
    Params,
    StorageParams,
    changes,
    load_params,
    stage_inputs,
    storage_for,
    with_changes,
    write_params,
)
from llmops.core.errors import LlmopsError
from llmops.core.storage import check_remote
from llmops.governance import audit
from llmops.pipeline import remote, workspaces
from llmops.pipeline.approval import NOBODY, Decision, Rejected, wait_for_decision
from llmops.pipeline.flows.states import completed, quiet_failed_states
from llmops.pipeline.orchestration import Busy, one_run_at_a_time
from llmops.pipeline.preflight import check_inputs
from llmops.pipeline.repro import StageError, repro
from llmops.pipeline.stage import ShowsFailure, declared, plan, summaries
from llmops.registry import versions as registry
from llmops.serving.deploy import Deployed, check_target, deploy, summary


class PipelineResult(BaseModel):
    project: str
    outputs: list[str]
    results: dict[str, Any]  # DVC stage name (e.g. train@pretrain) -> what the stage's publish() returned
    remote: str | None
    version: str  # the registered model version of this run's release
    deployed: Deployed | None  # where it is served (None: deploy.target is none)
    commit: str  # the commit it built (a run of the checkout: its HEAD, under the working tree's changes)


@task
def run_stage(root: str, stage: str) -> Any:
    """Run one DVC stage (skipped by DVC when unchanged); publish its artifacts, or what a failure still shows.

    Its output (progress, or a worker's traceback) streams to the console and the run's log as it comes.
    """
    module = declared(root)[stage.split("@")[0]].module
    try:
        run = repro(root, stage)
    except StageError as exc:  # an expected failure: its message, not a traceback
        if isinstance(module, ShowsFailure):
            module.publish_failed(Path(root), stage)
        return Failed(message=str(exc))
    return module.publish(Path(root), run)


@task(name="push", retries=2, retry_delay_seconds=5)
def push_outputs(root: str, storage: StorageParams) -> str | State:
    """Push every output recorded in dvc.lock to the remote."""
    try:
        log = remote.push(root, storage)
    except LlmopsError as exc:
        return Failed(message=str(exc))
    create_markdown_artifact(key="push", markdown=f"Pushed to `{storage.url}`\n\n```\n{log.strip()}\n```")
    return storage.url


@task(name="register")
def register_model(root: str) -> str | State:
    """Register models/release/ (what the gate passed) as the next model version, unless it already is one."""
    from prefect.runtime import flow_run

    try:
        version, new = registry.register(root, f"passed the release gate in flow run {flow_run.name}")
    except LlmopsError as exc:
        return Failed(message=str(exc))
    create_markdown_artifact(key="register", markdown=(
        f"{'Registered' if new else 'Already registered as'} **{registry.ARTIFACT} {version.version}** "
        f"(`{version.lineage.get('variant')}`); `llmops registry lineage {version.version}` shows where it came from"))
    return version.version


@task(name="deploy")
def deploy_model(root: str, version: str, params: DeployParams) -> Deployed | None | State:
    """Staging, a smoke request to the candidate, then production on the local server (deploy in params)."""
    from prefect.runtime import flow_run

    try:
        deployed = deploy(Path(root), version, params, f"flow run {flow_run.name}")
    except LlmopsError as exc:
        return Failed(message=f"deploy: {exc}")
    if deployed is not None:
        create_markdown_artifact(key="deploy", markdown=f"```\n{summary(deployed)}\n```")
    return deployed


@flow(name="build-model", log_prints=True)
def build_model(params: Params | None = None, push: bool = True, project_dir: str | None = None,
                commit: str | None = None) -> PipelineResult | State:
    """Run every stage of dvc.yaml in order (data, validation, training, evaluation, the gate, the release), then push,
    register the release as a model version and deploy it (staging, smoke request, production).

    Args:
        params: the run's parameters; the values that differ from params.yaml are written
            into the workspace's (like `dvc exp run -S`) so dvc.lock records them, and reach
            the checkout's only with the run's outputs. None uses params.yaml as it is. In a
            deployment's run (the UI's form) only the values that differ from the deployment's
            defaults are applied, over the built commit's params.yaml.
        push: push the outputs to the remote (storage in params; LLMOPS_S3_* env overrides).
        project_dir: the project root (holds dvc.yaml); defaults to the working directory.
        commit: a commit, branch or tag to build (in a workspace of its own: a git worktree
            sharing the project's DVC cache; removed after success, kept after a failure).
            None builds the project checkout as it is, and lands the result there.
    """
    root = Path(project_dir or os.getcwd()).resolve()
    quiet_failed_states()
    try:
        if commit is None:
            with locks.exclusive(root / locks.RUN_LOCK, "a pipeline run"):
                return _build_in_workspace(root, None, params, push)
        return _build_in_workspace(root, commit, params, push)
    except Busy as exc:  # another run holds the device pool: not a failure of this one
        return Cancelled(name="Skipped", message=str(exc))
    except Rejected as exc:
        return Cancelled(name="Rejected", message=str(exc))
    except LlmopsError as exc:
        # expected failures end the run with their message; anything else keeps its traceback
        return Failed(message=str(exc))


def _build_in_workspace(root: Path, commit: str | None, params: Params | None, push: bool) -> PipelineResult:
    """Build `commit` (None: the checkout as it is) in a workspace of its own; a run of the checkout lands there once
    its model is registered (llmops/pipeline/workspaces.py)."""
    from prefect.runtime import flow_run

    name = flow_run.name or "run"
    ws = workspaces.of_checkout(root, name) if commit is None else workspaces.create(root, commit, name)
    built = "the checkout" if commit is None else f"commit {ws.commit[:12]} ({commit})"
    print(f"building {built} in a workspace of its own: {ws.path}")
    try:
        with locks.exclusive(ws.path / locks.RUN_LOCK, "a pipeline run"):  # `llmops workspaces clean` leaves it be
            result = _build(ws, root, params, push)
    except (Busy, Rejected):  # nothing was built, or it was built (and landed) and a person said no
        workspaces.remove(root, ws.path)
        raise
    except BaseException as exc:
        print(f"the workspace is kept for inspection: {ws.path} (`llmops workspaces` lists them)")
        if isinstance(exc, LlmopsError):
            where = (f"commit {ws.commit[:12]}" if commit is not None else
                     "the checkout holds its outputs" if ws.landed else "the checkout is as it was")
            raise LlmopsError(f"{exc} ({where}; workspace kept: {ws.path})") from None
        raise
    workspaces.remove(root, ws.path)
    return result


def _build(ws: workspaces.Workspace, root: Path, params: Params | None, push: bool) -> PipelineResult:
    """The stages in the workspace; the servers it deploys to are the project's (`root`)."""
    work = ws.path
    params = _form_changes(work, params)
    named = stage_inputs(params or load_params(work / PARAMS_FILE))
    workspaces.link_inputs(ws, root, [value for pairs in named.values() for _, value in pairs])
    if params is not None:
        check_inputs(params, work)  # before any output is touched
    _apply(work / PARAMS_FILE, params)  # a workspace kept after a failure shows the params the run failed with
    return _stages(ws, root, push)


def _form_changes(work: Path, params: Params | None) -> Params | None:
    """A deployment's run applies what its form changed (the values that differ from the deployment's defaults,
    params.yaml as `llmops setup` found it) over the params.yaml of the commit it builds; None: nothing changed.

    So a scheduled or pushed run, or a form left as it was, builds the commit's own params, not setup's copy.
    """
    from prefect.client.orchestration import get_client
    from prefect.runtime import deployment

    if params is None or deployment.id is None:
        return params
    with get_client(sync_client=True) as client:  # (prefect.runtime's deployment.parameters are the run's own)
        defaults = client.read_deployment(deployment.id).parameters.get("params")
    if defaults is None:
        return params
    try:
        changed = changes(Params.model_validate(defaults), params)
    except ValueError:  # defaults of an older schema (setup ran before an upgrade): the run's params as given
        return params
    if not changed:
        return None
    print(f"the run changes {', '.join(sorted(changed))} from the deployment's defaults: applied to the params.yaml "
          "of the commit it builds")
    return with_changes(load_params(work / PARAMS_FILE), changed)


def _stages(ws: workspaces.Workspace, root: Path, push: bool) -> PipelineResult:
    from prefect.runtime import deployment

    work = ws.path
    params = load_params(work / PARAMS_FILE)
    storage = storage_for(params.storage, work)
    if push:
        check_remote(storage)  # fail before any work rather than after it
    # and so for what a stage needs once it has worked (its audit record) and what the run ends with (a port)
    audit.check_writable(work)
    try:
        check_target(root, params.deploy)
    except LlmopsError as exc:
        raise LlmopsError(f"deploy: {exc}") from None
    results, outputs = {}, []
    # a deployment's run needs the limit `llmops setup` made; a `llmops run` holds it only if the server has it
    with one_run_at_a_time(params.orchestration, strict=deployment.id is not None):
        for stage in plan(work):
            task_run = run_stage.with_options(name=stage.spec.name, task_run_name=stage.dvc_name)
            results[stage.dvc_name] = completed(task_run(str(work), stage.dvc_name, return_state=True))
            outputs += stage.outs
        pushed_to = completed(push_outputs(str(work), storage, return_state=True)) if push else None
        if ws.checkout is not None:  # before registering: a refusal leaves no version behind
            workspaces.check_landing(ws, root)
        version = completed(register_model(str(work), return_state=True))
    if ws.checkout is not None:
        workspaces.land(ws, root)
        print("the checkout now holds this run's outputs, dvc.lock and params.yaml")
    if params.deploy.require_approval and params.deploy.target != "none":
        _approved(root, version, params.deploy.approval_timeout_s, summaries(work, results))  # outside the limit
    deployed = completed(deploy_model(str(root), version, params.deploy, return_state=True))
    return PipelineResult(project=str(root if ws.checkout is not None else work), outputs=outputs, results=results,
                          remote=pushed_to, version=version, deployed=deployed, commit=ws.commit)


def _approved(root: Path, version: str, timeout_s: float, scores: list[str]) -> None:
    """Pause for a reviewer before `version` takes production; record the decision; raise Rejected unless approved."""
    from prefect.runtime import flow_run

    production = registry.holder(root, "production")
    if production is not None and production.version == version:
        print(f"{version} already holds production: nothing to approve")
        return
    decision = wait_for_decision(version, production and production.version, scores, timeout_s)
    timed_out = decision is None  # a rejection nobody made: no person to check against the access policy
    if timed_out:
        decision = Decision(approve=False, reviewer=NOBODY,
                            reason=f"no decision within {timeout_s:g} s (deploy.approval_timeout_s)")
    registry.review(root, version, decision.approve, decision.reviewer, f"{decision.reason} (flow run {flow_run.name})",
                    by_person=not timed_out)
    verdict = "approved" if decision.approve else "rejected"
    print(f"{version} {verdict} by {decision.reviewer}: {decision.reason}")
    if not decision.approve:
        stays = f"production stays on {production.version}" if production else "nothing is in production"
        raise Rejected(f"{version} was rejected by {decision.reviewer}: {decision.reason}; {stays}")


def _apply(path: Path, params: Params | None) -> None:
    """Write the run's params into the workspace's params.yaml (like `dvc exp run -S`), saying what changed."""
    if params is None:
        return
    old = load_params(path)
    for key in write_params(path, params):
        print(f"params.yaml: {key}: {_dotted(old, key)!r} -> {_dotted(params, key)!r} for this run")


def _dotted(params: Params, key: str):
    value = params
    for part in key.split("."):
        value = getattr(value, part)
    return value
