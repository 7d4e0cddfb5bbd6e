"""The pipeline flow: prepare_data -> validate_data -> train@pretrain -> train@finetune -> evaluate -> push.

Prefect decides when and whether; DVC (dvc.yaml) says what each stage does and
skips stages whose inputs did not change. A stage that fails stops the run
with its reason; nothing after it runs and nothing is pushed.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from prefect import State, flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.states import Failed
from pydantic import BaseModel

from llmops import locks, remote
from llmops.config import PARAMS_FILE, ConfigError, Params, StorageParams, load_params, storage_for, write_params
from llmops.datasets import write_text
from llmops.preflight import check_inputs
from llmops.repro import StageError
from llmops.storage import StorageError, check_remote
from tasks.evaluate import EvalResult, evaluate
from tasks.prepare_data import prepare_data
from tasks.train import train
from tasks.validate_data import validate_data

OUTPUTS = [
    "data/prepared/", "reports/validate_data/report.md", "reports/validate_data/result.json",
    "models/pretrain/", "models/finetune/", "reports/train/", "reports/evaluate/metrics.json",
]


class PipelineResult(BaseModel):
    project: str
    outputs: list[str]
    evaluation: EvalResult
    remote: str | None


class _Stopped(Exception):
    """A task ended in a failed state; its message says why."""


@task(name="push", retries=2, retry_delay_seconds=5)
def push_outputs(root: str, storage: StorageParams) -> str | State:
    """Push every output recorded in dvc.lock to the remote."""
    try:
        log = remote.push(root, storage)
    except (StageError, StorageError) as exc:
        return Failed(message=str(exc))
    create_markdown_artifact(key="push", markdown=f"Pushed to `{storage.url}`\n\n```\n{log.strip()}\n```")
    return storage.url


def _completed(state: State):
    if not state.is_completed():
        raise _Stopped(state.message)
    return state.result()


@flow(name="build-model", log_prints=True)
def build_model(params: Params | None = None, push: bool = True, project_dir: str | None = None) -> PipelineResult | State:
    """Prepare and validate the data, pretrain and fine-tune, evaluate, then push everything to the DVC remote.

    Args:
        params: the run's parameters; the values that differ from params.yaml are written
            into it (like `dvc exp run -S`) so dvc.lock records them, and put back if the run
            fails. None uses params.yaml as it is.
        push: push the outputs to the remote (storage in params; LLMOPS_S3_* env overrides).
        project_dir: the project root (holds dvc.yaml); defaults to the working directory.
    """
    root = Path(project_dir or os.getcwd()).resolve()
    _quiet_failed_states()
    try:
        with locks.exclusive(root / locks.RUN_LOCK, "a pipeline run"):
            if params is not None:
                check_inputs(params, root)  # before any output is touched
            with _params_applied(root / PARAMS_FILE, params):
                return _stages(root, push)
    except (ConfigError, StorageError, _Stopped, locks.Busy) as exc:
        # expected failures end the run with their message; anything else keeps its traceback
        return Failed(message=str(exc))


def _stages(root: Path, push: bool) -> PipelineResult:
    storage = storage_for(load_params(root / PARAMS_FILE).storage, root)
    if push:
        check_remote(storage)  # fail before any work rather than after it
    _completed(prepare_data(str(root), return_state=True))
    _completed(validate_data(str(root), return_state=True))
    for mode in ("pretrain", "finetune"):
        _completed(train(str(root), mode, return_state=True))
    evaluation = _completed(evaluate(str(root), return_state=True))
    pushed_to = _completed(push_outputs(str(root), storage, return_state=True)) if push else None
    return PipelineResult(project=str(root), outputs=OUTPUTS, evaluation=evaluation, remote=pushed_to)


class _NoEmptyTraceback(logging.Filter):
    """Prefect logs a task that returned a Failed state with exc_info=True and no exception: a stray `NoneType: None`."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[0] is None:
            record.exc_info = None
        return True


def _quiet_failed_states() -> None:
    logger = logging.getLogger("prefect.task_runs")
    if not any(isinstance(f, _NoEmptyTraceback) for f in logger.filters):
        logger.addFilter(_NoEmptyTraceback())


@contextmanager
def _params_applied(path: Path, params: Params | None) -> Iterator[None]:
    """Write the run's params into params.yaml for the block; put the file back as it was if the block fails."""
    if params is None:
        yield
        return
    before = path.read_bytes()
    old = load_params(path)
    changed = write_params(path, params)
    for key in changed:
        print(f"params.yaml: {key}: {_dotted(old, key)!r} -> {_dotted(params, key)!r} for this run")
    try:
        yield
    except BaseException:
        if changed:
            write_text(path, before.decode())
            print("params.yaml: put back as it was before this run (the run did not complete)")
        raise


def _dotted(params: Params, key: str):
    value = params
    for part in key.split("."):
        value = getattr(value, part)
    return value
