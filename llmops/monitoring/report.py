"""The monitor's report: production traffic of a window against a reference, in an Evidently 0.7 report.

Each answered request of the request log becomes a row: the prompt (its length, words, share
of words the reference never used, task family, PII it carried), the answer (length, empty,
cut by max_tokens, refusal, format, right or wrong where a checker knows the answer, harmful),
its latency, and the user's rating. Evidently computes every figure (drift per column with a
pinned method, rates, quantiles, ratings grouped by version and task); the numbers are read
back from its JSON, so the HTML a person opens and the metrics JSON alerts use agree.
The reference is the served version's own training and eval data (read through DVC at the
version's commit) or the window before.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections import Counter
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel

from llmops.core.config import MonitorParams
from llmops.governance import pii
from llmops.monitoring.checks import Checker, Detector, is_correct

DRIFT_COLUMNS = ("prompt_length", "prompt_words", "oov_share", "task", "pii", "answer_length")
CATEGORICAL = ("task", "pii")
RATES = ("empty", "truncated", "refusal", "format_ok", "wrong", "harmful_prompt", "harmful_answer", "agreement")
_PII_MARK = re.compile(r"\[(?:%s)\]" % "|".join(k.upper() for k in pii.PATTERNS))


class Figures(BaseModel):
    """What the report says, as numbers (metrics.json)."""

    window: dict[str, Any]  # start, end, requests, answered, errors, skipped lines, files
    reference: dict[str, Any]  # kind, source, rows
    drift: dict[str, Any]  # share, method, threshold, columns: {name: {score, drifted}}
    quality: dict[str, Any]  # empty/truncated/refusal/format rates, answer length
    traffic: dict[str, Any]  # error rate, latency p50/p95, pii rate, task mix
    hallucination: dict[str, Any]  # checked, wrong_rate, by task; consistency
    harmful: dict[str, Any]  # prompt and answer rates, detectors
    feedback: dict[str, Any]  # rated, mean rating, by version, by task
    fairness: dict[str, Any] = {}
    flagged: int = 0


def has_pii(text: str) -> bool:
    """Whether the (masked) text held personal data: the request log keeps its [EMAIL]/[PHONE]/... placeholders."""
    return _PII_MARK.search(text) is not None


def words(text: str) -> list[str]:
    """Lowercased word tokens, as scikit-learn's CountVectorizer splits them (Evidently brings scikit-learn)."""
    return _analyzer()(text)


@lru_cache(maxsize=1)
def _analyzer() -> Callable[[str], list[str]]:
    from sklearn.feature_extraction.text import CountVectorizer

    return CountVectorizer(token_pattern=r"(?u)\b\w+\b").build_analyzer()


def _shape(text: str) -> str:
    """Digits as 9 and letters as a: an answer has the right format when its shape is the expected answer's."""
    return re.sub(r"\d+", "9", re.sub(r"[^\W\d_]+", "a", text.strip()))


def rows(records: list[dict], check: Checker, refusals: list[str]) -> list[dict[str, Any]]:
    """One row per answered request (or reference example): the text columns and what checking them says."""
    out = []
    lowered = [r.lower() for r in refusals]
    for r in records:
        prompt, answer = r.get("prompt") or "", r.get("answer") or ""
        verdict = check(prompt)
        out.append({
            "request_id": r.get("request_id"), "model_version": r.get("model_version") or "unknown",
            "prompt": prompt, "answer": answer, "task": verdict[0] if verdict else "other",
            "expected": verdict[1] if verdict else None,
            "wrong": float(not is_correct(answer, verdict[1])) if verdict else math.nan,
            "format_ok": float(_shape(answer) == _shape(verdict[1])) if verdict else math.nan,
            "empty": float(not answer.strip()),
            "truncated": float(r["finish_reason"] == "length") if r.get("finish_reason") else math.nan,
            "refusal": float(any(p in answer.lower() for p in lowered)),
            "latency_ms": r.get("latency_ms", math.nan),
        })
    return out


def judge_harm(table: list[dict], detectors: dict[str, Detector]) -> dict[str, dict[str, float]]:
    """Mark each row's prompt and answer harmful when any detector says so; returns each detector's rates."""
    by_detector = {}
    for name, detect in detectors.items():
        on_prompts, on_answers = detect([r["prompt"] for r in table]), detect([r["answer"] for r in table])
        by_detector[name] = {"prompt_rate": _share(on_prompts), "answer_rate": _share(on_answers)}
        for row, p, a in zip(table, on_prompts, on_answers, strict=True):
            row["harmful_prompt"] = float(p or row.get("harmful_prompt", 0.0))
            row["harmful_answer"] = float(a or row.get("harmful_answer", 0.0))
    for row in table:
        row.setdefault("harmful_prompt", math.nan if not detectors else 0.0)
        row.setdefault("harmful_answer", math.nan if not detectors else 0.0)
    return by_detector


def _share(flags: list[bool]) -> float | None:
    return sum(flags) / len(flags) if flags else None


def report(current: list[dict], reference: list[dict], params: MonitorParams):
    """The Evidently report of the window against the reference; returns (snapshot, metric values by name)."""
    import pandas as pd
    from evidently import DataDefinition, Dataset, Report
    from evidently.core.datasets import DatasetColumn
    from evidently.descriptors import CustomColumnDescriptor, TextLength, WordCount
    from evidently.metrics import DriftedColumnsCount, MeanValue, QuantileValue, RowCount, ValueDrift
    from evidently.metrics.group_by import GroupBy

    vocabulary = {w for r in reference for w in words(r["prompt"])}

    def oov(column: DatasetColumn) -> DatasetColumn:
        # the share of a prompt's words the reference prompts never used (NLTK's English word list would need a
        # download at run time, and the training data's own vocabulary is the one a model has seen)
        return DatasetColumn(type="num", data=column.data.map(
            lambda t: (sum(w not in vocabulary for w in ws) / len(ws)) if (ws := words(t)) else 0.0))

    def pii_hits(column: DatasetColumn) -> DatasetColumn:
        return DatasetColumn(type="cat", data=column.data.map(lambda t: "yes" if has_pii(t) else "no"))

    numeric = ["latency_ms", "rating", *RATES]
    definition = DataDefinition(text_columns=["prompt", "answer"], categorical_columns=["task", "model_version"],
                                numerical_columns=numeric)
    descriptors = [TextLength("prompt", alias="prompt_length"), WordCount("prompt", alias="prompt_words"),
                   CustomColumnDescriptor("prompt", oov, alias="oov_share"),
                   CustomColumnDescriptor("prompt", pii_hits, alias="pii"),
                   TextLength("answer", alias="answer_length")]

    def dataset(table: list[dict]):
        frame = pd.DataFrame(table).reindex(columns=["prompt", "answer", "task", "model_version", *numeric])
        frame[["prompt", "answer"]] = frame[["prompt", "answer"]].fillna("")
        frame[numeric] = frame[numeric].astype(float)
        return Dataset.from_pandas(frame, data_definition=definition, descriptors=descriptors)

    drift = params.drift
    metrics = [RowCount(), DriftedColumnsCount(
        columns=list(DRIFT_COLUMNS), num_method=drift.numerical, cat_method=drift.categorical,
        num_threshold=drift.numerical_threshold, cat_threshold=drift.categorical_threshold,
        drift_share=params.alerts.max_drift_share)]
    metrics += [ValueDrift(column=c, method=drift.categorical, threshold=drift.categorical_threshold)
                if c in CATEGORICAL else
                ValueDrift(column=c, method=drift.numerical, threshold=drift.numerical_threshold)
                for c in DRIFT_COLUMNS]
    metrics += [MeanValue(column=c) for c in (*RATES, "answer_length", "oov_share", "rating")]
    metrics += [QuantileValue(column="latency_ms", quantile=q) for q in (0.5, 0.95)]
    metrics += [GroupBy(MeanValue(column="rating"), "model_version"), GroupBy(MeanValue(column="rating"), "task"),
                GroupBy(MeanValue(column="wrong"), "task")]
    with warnings.catch_warnings():  # numpy's "mean of empty slice" for a column the window has no values of
        warnings.simplefilter("ignore")
        # with its tests: each ValueDrift's verdict (drift or not, by its method's rule and threshold) comes with it
        snapshot = Report(metrics, include_tests=True).run(current_data=dataset(current),
                                                           reference_data=dataset(reference))
    return snapshot, _values(json.loads(snapshot.json()))


def _values(data: dict) -> dict[str, Any]:
    """Each metric's current value under a short name: drift:<column>, mean:<column>, p95:latency_ms, ...;
    grouped ones as <name>:<column>=<label>."""
    found: dict[str, Any] = {}
    for m in data["metrics"]:
        config, value = m["config"], m["value"]
        kind = config["type"].rsplit(":", 1)[-1]
        if kind == "GroupByMetric":
            inner = config["metric"]
            found[f"mean:{inner['column']}:{config['column_name']}={config['label']}"] = _number(value)
        elif kind == "ValueDrift":
            found[f"drift:{config['column']}"] = _number(value)
        elif kind == "DriftedColumnsCount":
            found["drifted_columns"] = {k: _number(v) for k, v in value.items()}
        elif kind == "MeanValue":
            found[f"mean:{config['column']}"] = _number(value)
        elif kind == "QuantileValue":
            found[f"p{round(config['quantile'] * 100)}:{config['column']}"] = _number(value)
        elif kind == "RowCount":
            found["rows"] = _number(value)
    for test in data.get("tests", []):
        config = test.get("metric_config", {}).get("params", {})
        if config.get("type", "").endswith(":ValueDrift"):
            found[f"drifted:{config['column']}"] = {"drifted": test["status"] == "FAIL", "method": config["method"],
                                                    "threshold": config["threshold"]}
    return found


def given(value: Any) -> bool:
    """A value that is there: not None, not NaN (pandas' and Evidently's missing value)."""
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def _number(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def figures(values: dict[str, Any], current: list[dict], window, reference: dict[str, Any], errors: int,
            params: MonitorParams, by_detector: dict, consistency: dict) -> Figures:
    """The metrics JSON, from the report's values."""
    tasks = Counter(row["task"] for row in current)
    total = len(current) + errors

    def grouped(name: str) -> dict[str, float]:  # mean:<column>:<group>=<label> -> {label: value}
        return {k.split("=", 1)[1]: v for k, v in values.items() if k.startswith(name + "=") and v is not None}

    checked = sum(1 for r in current if r["expected"] is not None)
    return Figures(
        window={"start": window.start.isoformat(), "end": window.end.isoformat(), "requests": total,
                "answered": len(current), "errors": errors, "skipped_lines": window.skipped[:20],
                "skipped": len(window.skipped), "files": window.files},
        reference=reference,
        drift={"share": values["drifted_columns"]["share"], "count": values["drifted_columns"]["count"],
               "columns": {c: {"score": values[f"drift:{c}"], **values[f"drifted:{c}"]} for c in DRIFT_COLUMNS}},
        quality={"empty_rate": values["mean:empty"], "truncated_rate": values["mean:truncated"],
                 "refusal_rate": values["mean:refusal"], "format_ok_rate": values["mean:format_ok"],
                 "mean_answer_length": values["mean:answer_length"]},
        traffic={"error_rate": errors / total if total else None, "p50_latency_ms": values["p50:latency_ms"],
                 "p95_latency_ms": values["p95:latency_ms"],
                 "pii_rate": _share([has_pii(r["prompt"]) for r in current]),
                 "mean_oov_share": values["mean:oov_share"], "task_mix": dict(sorted(tasks.items()))},
        hallucination={"checked": checked, "wrong_rate": values["mean:wrong"],
                       "wrong_rate_by_task": grouped("mean:wrong:task"),
                       "consistency": consistency},
        harmful={"prompt_rate": values["mean:harmful_prompt"], "answer_rate": values["mean:harmful_answer"],
                 "detectors": by_detector},
        feedback={"rated": sum(1 for r in current if given(r.get("rating"))), "mean_rating": values["mean:rating"],
                  "by_version": grouped("mean:rating:model_version"),
                  "by_task": grouped("mean:rating:task")},
    )


def write(out: Path, snapshot, fig: Figures, queue: list[dict]) -> None:
    """report.html, metrics.json and queue.jsonl into `out`, written whole (a temporary directory, then a rename)."""
    from llmops.core.fs import writing

    with writing(out) as tmp:
        tmp.mkdir()
        snapshot.save_html(str(tmp / "report.html"))
        (tmp / "metrics.json").write_text(fig.model_dump_json(indent=2) + "\n")
        (tmp / "queue.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queue))


def summary(fig: Figures, breaches: list) -> str:
    """The figures in a few markdown lines (the flow's artifact, and what `llmops monitor` prints)."""

    def pct(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.1%}"

    def num(v: float | None, digits: int = 3) -> str:
        return "n/a" if v is None else f"{v:.{digits}g}"

    drifted_columns = ", ".join(c for c, d in fig.drift["columns"].items() if d["drifted"]) or "none"
    consistency = fig.hallucination["consistency"]
    lines = [f"**Monitor**, {fig.window['start'][:16]} to {fig.window['end'][:16]} UTC: {fig.window['answered']} "
             f"answered, {fig.window['errors']} failed; reference: {fig.reference['source']}", "",
             "| figure | value |", "|---|---|",
             f"| drifted columns | {pct(fig.drift['share'])}: {drifted_columns} |",
             f"| wrong checkable answers | {pct(fig.hallucination['wrong_rate'])} of {fig.hallucination['checked']} |",
             f"| self-consistency (agreement of {consistency.get('samples', 'k')} samples) | "
             f"{num(consistency.get('mean_agreement'))} over {consistency['requests']} prompts |",
             f"| empty / truncated / refusals | {pct(fig.quality['empty_rate'])} / {pct(fig.quality['truncated_rate'])}"
             f" / {pct(fig.quality['refusal_rate'])} |",
             f"| harmful prompts / answers | {pct(fig.harmful['prompt_rate'])} / {pct(fig.harmful['answer_rate'])} |",
             f"| prompts with PII | {pct(fig.traffic['pii_rate'])} |",
             f"| error rate, p95 latency | {pct(fig.traffic['error_rate'])}, "
             f"{num(fig.traffic['p95_latency_ms'], 4)} ms |",
             f"| mean rating (1-5) | {num(fig.feedback['mean_rating'])} ({fig.feedback['rated']} rated) |",
             f"| flagged for review | {fig.flagged} |"]
    if fig.fairness:
        offline = fig.fairness["offline_audit"]
        lines += ["", f"Fairness probes of {fig.fairness['version']} (how much the answer changes when the group is "
                  "swapped, 0 to 1; the offline audit's pct_stereotype: "
                  f"{num(offline.get('pct_stereotype'))}, 50 is unbiased):", ""]
        lines += [f"- {t}: {v['mean_divergence']:.3f} ({v['differ_rate']:.0%} of pairs differ)"
                  for t, v in fig.fairness["by_type"].items()]
    if breaches:
        lines += ["", *(f"- **alert** {b.message} ({b.check})" for b in breaches)]
    return "\n".join(lines) + "\n"
