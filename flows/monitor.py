"""The monitor flow: judge the deployed model's traffic of a window, alert on breaches, and retrain on new data.

judge   the request log's window against a reference, in an Evidently report (llmops/monitor.py), with
        self-consistency and counterfactual fairness probes sent to the live endpoint; the HTML report,
        the metrics JSON and the review queue go to .llmops/monitor/reports/<window end>/ and into artifacts
alert   each threshold crossed (monitor.alerts) is recorded in .llmops/monitor/alerts.jsonl, emitted as a
        Prefect event, and sent through the notification block monitor.alerts.notify names
retrain when drift or quality crosses its retrain threshold, or enough corrections wait, the accepted
        corrections become a new dataset version (a commit), and the pipeline deployment starts on it as
        a git push would start it: the gate and the approval then judge the new model as any other
"""

from __future__ import annotations

import json
import math
import os
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from prefect import State, flow, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.states import Failed
from pydantic import BaseModel

from flows.states import completed, failed_as_state, quiet_failed_states
from llmops import monitor as figures_of
from llmops import registry, servers
from llmops.checks import checker, detectors
from llmops.config import PARAMS_FILE, MonitorParams, Params, load_params
from llmops.deploy import DEPLOY_USER
from llmops.errors import LlmopsError
from llmops.feedback import Store, database_url
from llmops.monitor import Breach, Figures, MonitorError
from llmops.probes import PROBE_USER
from llmops.requestlog import LOG_DIR, Window, read_window

OUT_DIR = Path(".llmops/monitor")


class Judged(BaseModel):
    """What the monitor found in one window."""

    start: str
    end: str
    requests: int
    out_dir: str | None = None  # None: no report (no traffic)
    figures: Figures | None = None
    breaches: list[Breach] = []
    flagged: int = 0
    note: str = ""


class MonitorResult(BaseModel):
    judged: Judged
    alerted: list[str] = []
    retrain: list[str] = []  # what the loop did, a line each


def _served(root: Path, params: Params) -> tuple[servers.Server | None, str | None]:
    """The production server (if it runs) and the version it serves (else the registry's production version)."""
    live = servers.on_port(root, params.deploy.port)
    if live is not None:
        return live, live.version
    holder = registry.holder(root, "production")
    return None, holder.version if holder else None


def _reference(root: Path, params: MonitorParams, version: str | None, start: datetime,
               check) -> tuple[list[dict], dict[str, Any]]:
    if params.reference == "previous":
        before = read_window(_log(root, params), start - timedelta(hours=params.window_hours), start, _storage(root))
        rows = _answered(before.records)
        if not rows:
            raise MonitorError(f"the reference window before {start:%Y-%m-%d %H:%M} UTC has no traffic; use "
                               "monitor.reference: data, or a longer monitor.window_hours")
        return figures_of.rows(rows, check, params.refusals), {"kind": "previous", "source": "the window before",
                                                               "rows": len(rows)}
    if version is None:
        raise MonitorError("no model in production and none served: there is no training data to compare with "
                           "(monitor.reference: data); deploy one (`llmops run`) or use monitor.reference: previous")
    import dvc.api

    found = registry.get(root, version)
    data = []
    for split in ("train", "eval"):
        try:
            text = dvc.api.read(f"data/prepared/{split}.jsonl", repo=str(root), rev=found.commit)
        except Exception as exc:  # DVC's errors are many; each means the same here: the reference is not there
            raise MonitorError(f"the reference data of {version} (data/prepared/{split}.jsonl at commit "
                               f"{found.commit[:12]}) cannot be read from the DVC cache or remote: "
                               f"{str(exc).splitlines()[0]}") from None
        data += [json.loads(line) for line in text.splitlines() if line.strip()]
    records = [{"prompt": r.get("prompt", ""), "answer": r.get("response", ""), "model_version": version}
               for r in data]
    return figures_of.rows(records, check, params.refusals), {
        "kind": "data", "source": f"{version}'s train and eval data (commit {found.commit[:12]})", "rows": len(data)}


def _log(root: Path, params: MonitorParams) -> str:
    return params.request_log or str(root / LOG_DIR)


def _storage(root: Path):
    from llmops.config import storage_for

    return storage_for(load_params(root / PARAMS_FILE).storage, root)


PROBE_USERS = {PROBE_USER, DEPLOY_USER}  # requests llmops sends itself are not traffic


def _answered(records: list[dict]) -> list[dict]:
    return [r for r in records if r.get("status") == 200 and r.get("user") not in PROBE_USERS]


@task(name="judge")
def judge(root: str, params: Params, end: datetime) -> Judged | State:
    """The window's report, figures and review queue (see the module's docstring)."""
    return failed_as_state(lambda: _judge(root, params, end))


def _judge(root: str, params: Params, end: datetime) -> Judged:
    from openai import OpenAI

    from llmops import probes
    from llmops.deploy import project_key

    root_path, mp = Path(root), params.monitor
    start = end - timedelta(hours=mp.window_hours)
    if mp.request_log is None and not (root_path / LOG_DIR).is_dir():  # no server has answered here yet
        window = Window(start=start, end=end)
    else:
        window = read_window(_log(root_path, mp), start, end, _storage(root_path))
    for line in window.skipped[:5]:
        print(f"skipped a corrupt log line: {line}")
    answered = _answered(window.records)
    errors = sum(1 for r in window.records if (r.get("status") or 0) >= 400 and r.get("user") not in PROBE_USERS)
    base = Judged(start=start.isoformat(), end=end.isoformat(), requests=len(answered) + errors)
    if len(answered) < mp.min_requests:
        base.note = (f"{len(answered)} answered requests from {start:%Y-%m-%d %H:%M} to {end:%Y-%m-%d %H:%M} UTC "
                     f"(monitor.min_requests is {mp.min_requests}): nothing to judge, no report")
        print(base.note)
        return base
    check = checker(mp.checkers)
    live, version = _served(root_path, params)
    reference, ref_info = _reference(root_path, mp, version, start, check)
    current = figures_of.rows(answered, check, mp.refusals)
    store = Store(database_url(root_path))
    rated = store.feedback_for([r["request_id"] for r in current if r["request_id"]])
    for row in current:
        found = rated.get(row["request_id"])
        row["rating"] = float(found["rating"]) if found else math.nan
        row["correction"] = found["correction"] if found else None
    by_detector = figures_of.judge_harm(current, detectors(mp.harmful))
    figures_of.judge_harm(reference, {})
    consistency, fairness, counted = {"requests": 0, "note": "no server answers for production"}, {}, {}
    if live is not None:
        key = project_key(root_path)
        counted = probes.server_metrics(live.url, key) | {"since": live.started}  # before the probes add to it
        client = OpenAI(base_url=live.url, api_key=key, max_retries=1, timeout=300)
        unchecked = [r for r in current if r["expected"] is None][: mp.consistency.requests]
        scores = probes.consistency(client, registry.ARTIFACT, [r["prompt"] for r in unchecked], mp.consistency)
        for row, score in zip(unchecked, scores, strict=True):
            row["agreement"] = score
        consistency = {"requests": len(scores), "samples": mp.consistency.samples,
                       "temperature": mp.consistency.temperature,
                       "mean_agreement": sum(scores) / len(scores) if scores else None}
        fairness = _fairness(root_path, client, version, mp)
    snapshot, values = figures_of.report(current, reference, mp)
    fig = figures_of.figures(values, current, window, ref_info, errors, mp, by_detector, consistency)
    fig.fairness = fairness
    fig.traffic["server"] = counted
    queue = [q for q in figures_of.flagged(current, mp.flag_rating)
             if q["request_id"] not in store.reviewed([q["request_id"] for q in current if q["request_id"]])]
    fig.flagged = len(queue)
    out = root_path / OUT_DIR / "reports" / end.strftime("%Y%m%dT%H%M%SZ")
    figures_of.write(out, snapshot, fig, queue)
    breaches = figures_of.breaches(fig, mp.alerts)
    _artifacts(out, fig, queue, breaches)
    return Judged(start=base.start, end=base.end, requests=base.requests, out_dir=str(out), figures=fig,
                  breaches=breaches, flagged=len(queue))


def _fairness(root: Path, client, version: str | None, mp: MonitorParams) -> dict[str, Any]:
    from llmops import probes

    if mp.fairness.pairs_per_type == 0:
        return {}
    pairs = probes.fairness(client, registry.ARTIFACT, mp.fairness)
    by_type: dict[str, list[float]] = {}
    for p in pairs:
        by_type.setdefault(p["bias_type"], []).append(p["divergence"])
    offline = {}
    release = root / servers.MODELS_DIR / (version or "none") / "release.json"
    if release.is_file():
        offline = json.loads(release.read_text()).get("scores", {}).get("audit_bias", {})
    return {"version": version, "pairs": len(pairs),
            "by_type": {t: {"mean_divergence": sum(v) / len(v), "differ_rate": sum(d > 0 for d in v) / len(v)}
                        for t, v in sorted(by_type.items())},
            "offline_audit": offline}


def _artifacts(out: Path, fig: Figures, queue: list[dict], breaches: list[Breach]) -> None:
    create_link_artifact(key="monitor-report", link=(out / "report.html").resolve().as_uri(),
                         link_text="Evidently report (open on the worker's machine)",
                         description=f"The window's Evidently report; its numbers: {out / 'metrics.json'}")
    create_markdown_artifact(key="monitor", markdown=summary_markdown(fig, breaches))
    create_table_artifact(key="review-queue", table=[{k: q[k] for k in ("request_id", "why", "task", "prompt",
                                                                           "answer", "suggested")} for q in queue],
                          description="Flagged responses: `llmops feedback accept|reject REQUEST_ID --reason ...`")


def summary_markdown(fig: Figures, breaches: list[Breach]) -> str:
    def pct(v):
        return "n/a" if v is None else f"{v:.1%}"

    lines = [f"**Monitor**, {fig.window['start'][:16]} to {fig.window['end'][:16]} UTC: {fig.window['answered']} "
             f"answered, {fig.window['errors']} failed; reference: {fig.reference['source']}", "",
             "| figure | value |", "|---|---|",
             f"| drifted columns | {pct(fig.drift['share'])} ({', '.join(c for c, d in fig.drift['columns'].items() if d['drifted']) or 'none'}) |",
             f"| wrong checkable answers | {pct(fig.hallucination['wrong_rate'])} of {fig.hallucination['checked']} |",
             f"| self-consistency | {fig.hallucination['consistency'].get('mean_agreement')} |",
             f"| empty / truncated / refusals | {pct(fig.quality['empty_rate'])} / {pct(fig.quality['truncated_rate'])} / {pct(fig.quality['refusal_rate'])} |",
             f"| harmful prompts / answers | {pct(fig.harmful['prompt_rate'])} / {pct(fig.harmful['answer_rate'])} |",
             f"| error rate, p95 latency | {pct(fig.traffic['error_rate'])}, {fig.traffic['p95_latency_ms']} ms |",
             f"| mean rating | {fig.feedback['mean_rating']} ({fig.feedback['rated']} rated) |",
             f"| flagged for review | {fig.flagged} |"]
    if fig.fairness:
        lines += ["", "Fairness probes (divergence of the answers when the group is swapped; offline audit: "
                  f"{fig.fairness['offline_audit']}):", ""]
        lines += [f"- {t}: {v['mean_divergence']:.3f} ({v['differ_rate']:.0%} differ)"
                  for t, v in fig.fairness["by_type"].items()]
    lines += ["", *(f"- **alert** {b.message} ({b.check})" for b in breaches)]
    return "\n".join(lines)


@task(name="alert")
def alert(root: str, judged: Judged) -> str | None:
    """Record each breach in alerts.jsonl and emit it as a Prefect event; returns the notification's text (None: no
    breach)."""
    from prefect.events import emit_event

    if not judged.breaches:
        return None
    moment = datetime.now(timezone.utc).isoformat()
    log = Path(root) / OUT_DIR / "alerts.jsonl"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as fh:
        for b in judged.breaches:
            fh.write(json.dumps({"time": moment, "window_end": judged.end, "report": judged.out_dir,
                                 **b.model_dump()}) + "\n")
    for b in judged.breaches:
        emit_event(event="llmops.monitor.alert", resource={"prefect.resource.id": f"llmops.monitor.{b.check}"},
                   payload=b.model_dump() | {"report": judged.out_dir})
    body = "\n".join([f"llmops monitor: {len(judged.breaches)} threshold(s) crossed in the window ending "
                      f"{judged.end[:16]} UTC", *(f"- {b.message} ({b.check})" for b in judged.breaches),
                      f"report: {judged.out_dir}/report.html"])
    print(body)
    return body


@task(name="notify", retries=2, retry_delay_seconds=5)
def notify(block_name: str, body: str) -> None | State:
    """Send the alert through a Prefect notification block (webhook, Slack, e-mail...); retried, as a webhook may
    be down for a moment."""
    from prefect.blocks.core import Block

    try:
        block = Block.load(block_name)
    except ValueError as exc:  # not a block: no retry helps
        return Failed(message=f"monitor.alerts.notify: {block_name!r}: {exc}")
    block.notify(body, subject="llmops monitor alert")
    return None


@task(name="retrain")
def retrain(root: str, params: Params, judged: Judged) -> list[str] | State:
    """Corrections -> a new dataset version -> a pipeline run, when a retrain threshold is crossed."""
    return failed_as_state(lambda: _retrain(root, params, judged))


def _retrain(root: str, params: Params, judged: Judged) -> list[str]:
    from llmops import corrections

    root_path = Path(root)
    store = Store(database_url(root_path))
    pending = len(store.accepted(unused_only=True))
    reason = figures_of.retrain_reason(judged.figures, pending, params.monitor.retrain) if judged.figures else None
    if reason is None and pending >= params.monitor.retrain.min_corrections:
        reason = f"{pending} accepted corrections wait"
    if reason is None:
        return []
    if not pending:
        return [f"retraining is due ({reason}) but there is no new data: review the queue "
                "(`llmops feedback queue`) and accept corrections"]
    version = corrections.new_version(root_path, store, checker(params.monitor.checkers))
    said = [f"retraining: {reason}", f"new dataset version {version.path} ({version.rows} corrections, {version.new} "
            f"new), commit {version.commit[:12]} on {version.branch}"]
    said += corrections.retrain(root_path, version, params.monitor.retrain.deployment)
    for line in said:
        print(line)
    return said


@flow(name="monitor", log_prints=True)
def monitor(project_dir: str | None = None, end: datetime | None = None) -> MonitorResult | Failed:
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
        sent = notify(params.monitor.alerts.notify, body, return_state=True) if body and params.monitor.alerts.notify \
            else None
        result = MonitorResult(judged=judged, alerted=[b.message for b in judged.breaches],
                               retrain=completed(retrain(str(root), params, judged, return_state=True)))
    except LlmopsError as exc:
        return Failed(message=str(exc))
    if sent is not None and not sent.is_completed():  # the loop ran; the failure to tell someone still fails the run
        return Failed(message=f"the alerts were recorded in {OUT_DIR / 'alerts.jsonl'} but not sent through "
                              f"{params.monitor.alerts.notify}: {sent.message}")
    return result
