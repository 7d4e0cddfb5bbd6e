"""Judging the deployed model's traffic of one window: what the monitor flow runs (without Prefect).

judge()           the request log's window against a reference (monitor_report: the Evidently report), with the
                  users' feedback, harmful-content detectors, and probes of the live endpoint (self-consistency,
                  counterfactual fairness); writes report.html, metrics.json and queue.jsonl
breaches()        the alert thresholds the figures cross; record_alerts() appends them to alerts.jsonl
retrain_reason()  whether drift, wrong answers or waiting corrections call for retraining (corrections.py acts)
"""

from __future__ import annotations

import json
import math
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from llmops.core import dvcyaml
from llmops.core.config import AlertParams, MonitorParams, Params, RetrainParams, storage_for
from llmops.core.errors import LlmopsError
from llmops.core.layout import MONITOR as OUT_DIR
from llmops.data.datasets import jsonl_lines
from llmops.monitoring import report
from llmops.monitoring.checks import Checker, checker, detectors
from llmops.monitoring.probes import PROBE_USER
from llmops.monitoring.report import Figures
from llmops.registry import versions as registry
from llmops.serving import instances as servers
from llmops.serving.deploy import DEPLOY_USER
from llmops.serving.feedback import Store, database_url
from llmops.serving.http_server import CLIENT_CLOSED
from llmops.serving.requestlog import LOG_DIR, Window, read_window

OWN_USERS = {PROBE_USER, DEPLOY_USER}  # requests llmops sends itself are not traffic


class MonitorError(LlmopsError):
    """The monitor cannot judge this window; the message says what is missing."""


class Breach(BaseModel):
    check: str  # the params key, e.g. monitor.alerts.max_error_rate
    value: float
    threshold: float
    message: str


class Judged(BaseModel):
    """What the monitor found in one window."""

    start: str
    end: str
    requests: int
    out_dir: str | None = None  # None: no report (no traffic)
    figures: Figures | None = None
    breaches: list[Breach] = []
    queue: list[dict[str, Any]] = []  # flagged responses nobody reviewed yet
    note: str = ""


def _answered(records: list[dict]) -> list[dict]:
    return [r for r in records if r.get("status") == 200 and r.get("user") not in OWN_USERS]


def _window(root: Path, params: Params, start: datetime, end: datetime) -> Window:
    location = params.monitor.request_log
    if location is None and not (root / LOG_DIR).is_dir():  # no server has answered in this project yet
        return Window(start=start, end=end)
    return read_window(location or root / LOG_DIR, start, end, storage_for(params.storage, root))


def _served(root: Path, params: Params) -> tuple[servers.Server | None, str | None]:
    """The production server (if it runs) and the version it serves (else the registry's production version)."""
    live = servers.on_port(root, params.deploy.port)
    if live is not None:
        return live, live.version
    holder = registry.holder(root, "production")
    return None, holder.version if holder else None


def _reference(root: Path, params: Params, version: str | None, start: datetime,
               check: Checker) -> tuple[list[dict], dict[str, Any]]:
    """The reference rows: the served version's train and eval data (through DVC, at its registered commit), or the
    window before."""
    mp = params.monitor
    if mp.reference == "previous":
        rows = _answered(_window(root, params, start - timedelta(hours=mp.window_hours), start).records)
        if not rows:
            raise MonitorError(f"the reference window before {start:%Y-%m-%d %H:%M} UTC has no traffic; use "
                               "monitor.reference: data, or a longer monitor.window_hours")
        return report.rows(rows, check, mp.refusals), {"kind": "previous", "source": "the window before",
                                                       "rows": len(rows)}
    if version is None:
        raise MonitorError("no model in production and none served: there is no training data to compare with "
                           "(monitor.reference: data); deploy one (`llmops run`) or use monitor.reference: previous")
    import dvc.api

    found = registry.get(root, version)
    prepared = Path(dvcyaml.stage(root, "prepare_data").outs[0])  # the splits' directory, as dvc.yaml declares it
    data = []
    for split in ("train", "eval"):
        try:
            text = dvc.api.read(str(prepared / f"{split}.jsonl"), repo=str(root), rev=found.commit)
        except Exception as exc:  # DVC's errors are many; each means the same here: the reference is not there
            raise MonitorError(f"the reference data of {version} ({prepared}/{split}.jsonl at commit "
                               f"{found.commit[:12]}) cannot be read from the DVC cache or remote: "
                               f"{str(exc).splitlines()[0]}") from None
        data += [json.loads(line) for line in jsonl_lines(text) if line.strip()]
    records = [{"prompt": r.get("prompt", ""), "answer": r.get("response", ""), "model_version": version}
               for r in data]
    return report.rows(records, check, mp.refusals), {
        "kind": "data", "source": f"{version}'s train and eval data (commit {found.commit[:12]})", "rows": len(data)}


def judge(root: str | Path, params: Params, end: datetime) -> Judged:
    """Judge the window of monitor.window_hours that ends at `end`; a window with too little traffic is judged
    'nothing to judge' (no report), never an error.

    Raises:
        MonitorError, LogError, ConfigError: the reference or the log cannot be read, a checker or detector is bad.
    """
    root, mp = Path(root), params.monitor
    start = end - timedelta(hours=mp.window_hours)
    window = _window(root, params, start, end)
    for line in window.skipped[:5]:
        print(f"skipped a corrupt log line: {line}")
    answered = _answered(window.records)
    errors = sum(1 for r in window.records if (r.get("status") or 0) >= 400 and r.get("status") != CLIENT_CLOSED
                 and r.get("user") not in OWN_USERS)  # a client that left is no failure of the model
    judged = Judged(start=start.isoformat(), end=end.isoformat(), requests=len(answered) + errors)
    if len(answered) < mp.min_requests:
        judged.note = (f"{len(answered)} answered requests from {start:%Y-%m-%d %H:%M} to {end:%Y-%m-%d %H:%M} UTC "
                       f"(monitor.min_requests is {mp.min_requests}): nothing to judge, no report")
        print(judged.note)
        return judged
    check = checker(mp.checkers)
    live, version = _served(root, params)
    reference, ref_info = _reference(root, params, version, start, check)
    current = report.rows(answered, check, mp.refusals)
    store = Store(database_url(root))
    rated = store.feedback_for([r["request_id"] for r in current if r["request_id"]])
    for row in current:
        found = rated.get(row["request_id"])
        row["rating"] = float(found["rating"]) if found else math.nan
        row["correction"] = found["correction"] if found else None
    by_detector = report.judge_harm(current, detectors(mp.harmful))
    report.judge_harm(reference, {})
    consistency, fairness, counted = {"requests": 0, "note": "no server answers for production"}, {}, {}
    if live is not None:
        from openai import OpenAIError

        try:
            consistency, fairness, counted = _probe(root, live, version, current, mp)
        except (OpenAIError, OSError) as exc:  # the server went away mid-probe: the log's figures are still judged
            why = f"the probes of {live.url} failed: {type(exc).__name__}: {exc}"
            print(f"warning: {why}; the report goes on without them")
            consistency = {"requests": 0, "note": why}
    snapshot, values = report.report(current, reference, mp)
    fig = report.figures(values, current, window, ref_info, errors, mp, by_detector, consistency)
    fig.fairness = fairness
    fig.traffic["server"] = counted
    reviewed = store.reviewed([r["request_id"] for r in current if r["request_id"]])
    judged.queue = [q for q in flagged(current, mp.flag_rating) if q["request_id"] not in reviewed]
    fig.flagged = len(judged.queue)
    out = root / OUT_DIR / "reports" / end.strftime("%Y%m%dT%H%M%SZ")
    report.write(out, snapshot, fig, judged.queue)
    judged.out_dir, judged.figures, judged.breaches = str(out), fig, breaches(fig, mp.alerts)
    return judged


def _probe(root: Path, live: servers.Server, version: str | None, current: list[dict], mp: MonitorParams):
    """The live server's counters, then self-consistency of unverifiable answers, then the fairness probes."""
    from openai import OpenAI

    from llmops.monitoring import probes
    from llmops.serving.deploy import project_key

    key = project_key(root)
    counted = probes.server_metrics(live.url, key) | {"since": live.started}  # before the probes add to them
    client = OpenAI(base_url=live.url, api_key=key, max_retries=1, timeout=300)
    unchecked = [r for r in current if r["expected"] is None][: mp.consistency.requests]
    scores = probes.consistency(client, registry.ARTIFACT, [r["prompt"] for r in unchecked], mp.consistency)
    for row, score in zip(unchecked, scores, strict=True):
        row["agreement"] = score
    consistency = {"requests": len(scores), "samples": mp.consistency.samples,
                   "temperature": mp.consistency.temperature, "mean_agreement": sum(scores) / len(scores) if scores else None}
    if mp.fairness.pairs_per_type == 0:
        return consistency, {}, counted
    by_type: dict[str, list[float]] = {}
    for pair in probes.fairness(client, registry.ARTIFACT, mp.fairness):
        by_type.setdefault(pair["bias_type"], []).append(pair["divergence"])
    release = root / servers.MODELS_DIR / (version or "none") / "release.json"
    offline = json.loads(release.read_text()).get("scores", {}).get("audit_bias", {}) if release.is_file() else {}
    fairness = {"version": version, "pairs": sum(map(len, by_type.values())), "offline_audit": offline,
                "by_type": {t: {"mean_divergence": sum(v) / len(v), "differ_rate": sum(d > 0 for d in v) / len(v)}
                            for t, v in sorted(by_type.items())}}
    return consistency, fairness, counted


def breaches(fig: Figures, alerts: AlertParams) -> list[Breach]:
    """Every alert threshold the window's figures cross."""
    harmful = max(v for v in (fig.harmful["prompt_rate"], fig.harmful["answer_rate"], 0.0) if v is not None)
    checks = [  # (key, value, the most it may be, what it is)
        ("max_drift_share", fig.drift["share"], alerts.max_drift_share, "share of monitored columns drifted"),
        ("max_empty_rate", fig.quality["empty_rate"], alerts.max_empty_rate, "empty answers"),
        ("max_truncated_rate", fig.quality["truncated_rate"], alerts.max_truncated_rate, "answers cut by max_tokens"),
        ("max_refusal_rate", fig.quality["refusal_rate"], alerts.max_refusal_rate, "refusals"),
        ("max_wrong_rate", fig.hallucination["wrong_rate"], alerts.max_wrong_rate, "wrong checkable answers"),
        ("max_harmful_rate", harmful, alerts.max_harmful_rate, "harmful prompts or answers"),
        ("max_error_rate", fig.traffic["error_rate"], alerts.max_error_rate, "requests that failed (4xx/5xx)"),
        ("max_p95_latency_ms", fig.traffic["p95_latency_ms"], alerts.max_p95_latency_ms, "p95 latency (ms)"),
    ]
    found = [Breach(check=f"monitor.alerts.{key}", value=value, threshold=limit,
                    message=f"{what}: {value:.4g} > {limit:.4g}")
             for key, value, limit, what in checks if value is not None and value > limit]
    rating = fig.feedback["mean_rating"]
    if rating is not None and rating < alerts.min_mean_rating:
        found.append(Breach(check="monitor.alerts.min_mean_rating", value=rating, threshold=alerts.min_mean_rating,
                            message=f"mean user rating: {rating:.3g} < {alerts.min_mean_rating:.3g}"))
    return found


def record_alerts(root: str | Path, judged: Judged) -> str | None:
    """Append the window's breaches to alerts.jsonl; returns the notification's text (None: no breach)."""
    if not judged.breaches:
        return None
    moment = datetime.now(timezone.utc).isoformat()
    log = Path(root) / OUT_DIR / "alerts.jsonl"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as fh:
        fh.writelines(json.dumps({"time": moment, "window_end": judged.end, "report": judged.out_dir,
                                  **b.model_dump()}) + "\n" for b in judged.breaches)
    return "\n".join([f"llmops monitor: {len(judged.breaches)} threshold(s) crossed in the window ending "
                      f"{judged.end[:16]} UTC", *(f"- {b.message} ({b.check})" for b in judged.breaches),
                      f"report: {judged.out_dir}/report.html"])


def retrain_reason(fig: Figures | None, pending: int, params: RetrainParams) -> str | None:
    """Why the pipeline should retrain now (None: no reason); it needs new data, the accepted corrections."""
    if fig is not None and fig.drift["share"] is not None and fig.drift["share"] >= params.on_drift_share:
        return (f"drift: {fig.drift['share']:.0%} of the monitored columns drifted (retrain at "
                f"{params.on_drift_share:.0%})")
    wrong = fig.hallucination["wrong_rate"] if fig is not None else None
    if wrong is not None and wrong >= params.on_wrong_rate:
        return f"quality: {wrong:.0%} of checkable answers were wrong (retrain at {params.on_wrong_rate:.0%})"
    if pending >= params.min_corrections:
        return f"{pending} accepted corrections are not in the training data yet (retrain at {params.min_corrections})"
    return None


def flagged(current: list[dict], flag_rating: int) -> list[dict[str, Any]]:
    """The responses a person should look at: low rating, harmful, PII in the prompt, or a failed check."""
    queue = []
    for row in current:
        why = []
        if report.given(row.get("rating")) and row["rating"] <= flag_rating:
            why.append(f"rated {row['rating']:.0f}")
        if row.get("harmful_prompt") == 1.0 or row.get("harmful_answer") == 1.0:
            why.append("harmful")
        if report.has_pii(row["prompt"]) or report.has_pii(row["answer"]):
            why.append("PII")
        if row.get("wrong") == 1.0:
            why.append("failed check")
        if why and row.get("request_id"):
            queue.append({"request_id": row["request_id"], "why": ", ".join(why), "task": row["task"],
                          "prompt": row["prompt"], "answer": row["answer"],
                          "suggested": row.get("correction") or row.get("expected")})
    return queue

