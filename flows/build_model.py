"""The pipeline flow: prepared data -> validated data -> pushed to the DVC remote.

Prefect decides when and whether; DVC (dvc.yaml) says what each stage does and
skips stages whose inputs did not change. Later stages (train, evaluate, ...)
join here as tasks in order.
"""

from __future__ import annotations

import os
from pathlib import Path

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from pydantic import BaseModel

from llmops.config import PARAMS_FILE, Params, StorageParams, load_params, storage_from_env, write_params
from llmops.remote import configure_remote, push
from llmops.storage import check_remote
from tasks.prepare_data import prepare_data
from tasks.validate_data import validate_data


class PipelineResult(BaseModel):
    project: str
    outputs: list[str]
    remote: str | None


@task(name="push", retries=2, retry_delay_seconds=5)
def push_outputs(root: str, storage: StorageParams) -> str:
    """Push every output recorded in dvc.lock to the remote."""
    log = push(root, storage)
    create_markdown_artifact(key="push", markdown=f"Pushed to `{storage.url}`\n\n```\n{log.strip()}\n```")
    return storage.url


@flow(name="build-model", log_prints=True)
def build_model(params: Params | None = None, push: bool = True, project_dir: str | None = None) -> PipelineResult:
    """Prepare and validate the dataset, then push it to the DVC remote.

    Args:
        params: the run's parameters; when given they are written to params.yaml
            (like `dvc exp run -S`) so dvc.lock records them. None uses params.yaml as it is.
        push: push the outputs to the remote (storage in params; LLMOPS_S3_* env overrides).
        project_dir: the project root (holds dvc.yaml); defaults to the working directory.
    """
    root = Path(project_dir or os.getcwd()).resolve()
    if params is not None and write_params(root / PARAMS_FILE, params):
        print(f"params.yaml updated with this run's parameters")
    params = load_params(root / PARAMS_FILE)
    storage = storage_from_env(params.storage)
    if push:
        check_remote(storage)  # fail before any work rather than after it
    prepared = prepare_data(str(root))
    validated = validate_data(str(root), wait_for=[prepared])
    remote = push_outputs(str(root), storage, wait_for=[validated]) if push else None
    outputs = ["data/prepared/", "reports/validate_data/report.md", "reports/validate_data/result.json"]
    return PipelineResult(project=str(root), outputs=outputs, remote=remote)
