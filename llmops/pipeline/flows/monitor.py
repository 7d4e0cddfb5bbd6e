"""The monitor flow: judge the deployed model's traffic of a window, alert on breaches, and retrain on new data.

judge   the request log's window against a reference in an Evidently report, with the users' feedback and
        probes of the live endpoint (llmops/monitoring/monitor.py); report.html, metrics.json and queue.jsonl go to
        .llmops/monitor/reports/<window end>/, a link, a summary and the review queue to artifacts
alert   each threshold crossed (monitor.alerts) is recorded in .llmops/monitor/alerts.jsonl, emitted as a
        Prefect event `llmops.monitor.alert`, and sent through the notification block monitor.alerts.notify
retrain when drift or wrong answers cross their retrain threshold, or enough corrections wait, the accepted
        corrections become a new dataset version (a commit) and the pipeline deployment starts on it, as a
        git push would start it: the gate and the approval judge the new model as any other
"""

from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path

from prefect import State, flow, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.states import Failed
from pydantic import BaseModel

from llmops.core.config import PARAMS_FILE, Params, load_params
from llmops.core.errors import LlmopsError
from llmops.monitoring import monitor
from llmops.monitoring.monitor import Judged
from llmops.monitoring.report import summary
from llmops.pipeline import corrections
from llmops.pipeline.flows.states import completed, failed_as_state, quiet_failed_states


class MonitorResult(BaseModel):
    judged: Judged
    retrain: list[str] = []  # what the loop did, a line each


@task(name="judge")
def judge(root: str, params: Params, end: datetime) -> Judged | State:
    """The window's report, figures and review queue, published as artifacts."""
    judged = failed_as_state(lambda: monitor.judge(root, params, end))
    if isinstance(judged, Judged) and judged.figures is not None:
        out = Path(judged.out_dir)
        create_link_artifact(key="monitor-report", link=(out / "report.html").resolve().as_uri(),
                             link_text="Evidently report (on the worker's machine)",
                             description=f"The window's Evidently report; its numbers: {out / 'metrics.json'}")
        create_markdown_artifact(key="monitor", markdown=summary(judged.figures, judged.breaches))
        create_table_artifact(key="review-queue", table=judged.queue or [{"request_id": "(none flagged)"}],
                              description="Flagged responses: `llmops feedback accept|reject REQUEST_ID --reason ...`")
    return judged


@task(name="alert")
def alert(root: str, judged: Judged) -> str | None:
    """Record each breach and emit it as a Prefect event (for automations); returns the notification's text."""
    from prefect.events import emit_event

    body = monitor.record_alerts(root, judged)
    for b in judged.breaches:
        emit_event(event="llmops.monitor.alert", resource={"prefect.resource.id": f"llmops.monitor.{b.check}"},
                   payload=b.model_dump() | {"report": judged.out_dir})
    if body:
        print(body)
    return body


@task(name="notify", retries=2, retry_delay_seconds=5)
def notify(block_name: str, body: str) -> None | State:
    """Send the alert through a Prefect notification block (webhook, Slack, e-mail...), retried: a receiver may be
    down for a moment."""
    from prefect.blocks.core import Block

    try:
        block = Block.load(block_name)
    except ValueError as exc:  # no such block: no retry helps
        return Failed(message=f"monitor.alerts.notify: {block_name!r}: {exc}")
    try:
        block.notify(body, subject="llmops monitor alert")
    except Exception as exc:  # whatever the receiver's failure (refused, 5xx, timeout): retried, then one line
        return Failed(message=f"{block_name}: {type(exc).__name__}: {exc}")
    return None


@task(name="retrain")
def retrain(root: str, params: Params, judged: Judged) -> list[str] | State:
    """Accepted corrections -> a new dataset version -> a pipeline run, when retraining is due."""
    said = failed_as_state(lambda: corrections.close_loop(Path(root), params, judged.figures))
    for line in said if isinstance(said, list) else []:
        print(line)
    return said


@flow(name="monitor", log_prints=True)
def monitor_flow(project_dir: str | None = None, end: datetime | None = None) -> MonitorResult | State:
    """Judge the production traffic of the window that ends at `end` (default: now), alert, and retrain if due.

    Args:
        project_dir: the project root (its params.yaml, request log and registry); default the working directory.
        end: the window's end (UTC); its length is monitor.window_hours.
    """
    root = Path(project_dir or os.getcwd()).resolve()
    quiet_failed_states()
    try:
        params = load_params(root / PARAMS_FILE)
        end = (end or datetime.now(timezone.utc)).astimezone(timezone.utc)
        judged = completed(judge(str(root), params, end, return_state=True))
        body = alert(str(root), judged)
        sent = notify(params.monitor.alerts.notify, body, return_state=True) \
            if body and params.monitor.alerts.notify else None
        result = MonitorResult(judged=judged, retrain=completed(retrain(str(root), params, judged,
                                                                        return_state=True)))
    except LlmopsError as exc:
        return Failed(message=str(exc))
    if sent is not None and not sent.is_completed():  # the loop ran; the failure to tell anyone still fails the run
        return Failed(message=f"the alerts were recorded in {monitor.OUT_DIR / 'alerts.jsonl'} but not sent "
                              f"through {params.monitor.alerts.notify}: {sent.message}")
    return result
