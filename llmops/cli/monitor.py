"""`llmops monitor` (run the monitor flow once) and `llmops feedback queue|accept|reject` (the review queue)."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

from llmops.cli import output
from llmops.core.errors import LlmopsError


def add_parser(sub: argparse._SubParsersAction) -> None:
    mon = sub.add_parser(
        "monitor", help="judge the deployed model's recent traffic: Evidently report, alerts, retraining",
        description="Run the monitor flow once (the `monitor/hourly` deployment runs it on a schedule): the request "
        "log's window (monitor.window_hours, ending now or at --end) against the reference, in an Evidently report "
        "(.llmops/monitor/reports/<end>/report.html, metrics.json, queue.jsonl); alerts for the thresholds crossed; "
        "a new dataset version and a pipeline run when retraining is due.")
    mon.add_argument("--end", help="the window's end, ISO 8601 (default: now, UTC)")

    fb = sub.add_parser(
        "feedback", help="the review queue of flagged responses; accept a correction into the training data",
        description="queue: the flagged responses of the latest monitor report that nobody reviewed yet. accept: the "
        "correction (the user's, or yours with --correction) joins the next dataset version; reject: it does not.")
    # each action its own subcommand: a flag is accepted only by the action it means something to
    actions = fb.add_subparsers(dest="action", required=True, metavar="ACTION")
    queue = actions.add_parser("queue", help="the flagged responses that wait for review")
    output.add_json(queue, "one JSON object per flagged response and line (as in the report's queue.jsonl)")
    for name, does in (("accept", "the correction joins the next dataset version"), ("reject", "it does not")):
        review = actions.add_parser(name, help=f"{name} a flagged response: {does}")
        review.add_argument("request_id", help="the response's id (`llmops feedback queue` lists them)")
        review.add_argument("--reason", required=True, help="why; kept with the review and in the audit trail")
        if name == "accept":
            review.add_argument("--correction", help="the right answer (default: the user's correction, or the "
                                "checker's answer)")
        review.add_argument("--reviewer", help="who decides: must be you (your OS account, or LLMOPS_TOKEN's key); "
                            "checked")


def main(args: argparse.Namespace) -> int:
    try:
        if args.command == "monitor":
            return _monitor(Path.cwd(), args.end)
        return _feedback(Path.cwd(), args)
    except LlmopsError as exc:
        print(f"error: {args.command}: {exc}", file=sys.stderr)
        return 1


def _monitor(root: Path, end: str | None) -> int:
    from llmops.pipeline.prefect_api import PrefectUnavailable, prefect_api

    try:
        moment = datetime.fromisoformat(end).astimezone(timezone.utc) if end else None
    except ValueError:
        print(f"error: monitor: --end {end!r}: not an ISO 8601 time (e.g. 2026-11-26T13:00:00Z)", file=sys.stderr)
        return 2
    try:
        with prefect_api(root):
            from llmops.pipeline.flows.monitor import monitor_flow

            state = monitor_flow(project_dir=str(root), end=moment, return_state=True)
    except PrefectUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if not state.is_completed():
        print(f"error: monitor {state.name.lower()}: {state.message}", file=sys.stderr)
        return 1
    result = state.result()
    judged = result.judged
    if judged.figures is None:
        print(judged.note)
        return 0
    from llmops.monitoring.report import summary

    print(summary(judged.figures, judged.breaches))
    print(f"\nreport: {judged.out_dir}/report.html (numbers: metrics.json; flagged: queue.jsonl, "
          "`llmops feedback queue`)")
    for line in result.retrain:
        print(line)
    return 0


def latest_queue(root: Path) -> list[dict]:
    """The review queue of the latest monitor report (reports are named by their window's end, so they sort)."""
    from llmops.monitoring.monitor import OUT_DIR

    reports = sorted((root / OUT_DIR / "reports").glob("*/queue.jsonl"))
    if not reports:
        raise LlmopsError("no monitor report yet: run `llmops monitor`")
    from llmops.data.datasets import jsonl_lines

    return [json.loads(line) for line in jsonl_lines(reports[-1].read_text()) if line.strip()]


def _feedback(root: Path, args: argparse.Namespace) -> int:
    from llmops.governance import audit, identity
    from llmops.serving.feedback import Store, database_url

    store = Store(database_url(root))
    if args.action == "queue":
        queue = latest_queue(root)
        done = store.reviewed([q["request_id"] for q in queue])
        waiting = [q for q in queue if q["request_id"] not in done]
        if args.json:
            output.show(output.json_lines(waiting))
            return 0
        for q in waiting:  # a record of several lines each, not a table: prompts and answers are long
            print(f"{q['request_id']}  [{q['why']}]  {q['task']}\n  prompt:    {q['prompt']!r}\n  answer:    "
                  f"{q['answer']!r}\n  suggested: {q['suggested']!r}")
        print(f"{len(waiting)} flagged responses wait for review" + (
            " (`llmops feedback accept|reject REQUEST_ID --reason ...`)" if waiting else ""))
        return 0
    reviewer = identity.check_named(root, args.reviewer)
    # a correction becomes training data: reviewing is the policy's to allow, and the trail's to record
    with audit.recorded(root, f"feedback.{args.action}", f"request:{args.request_id}", who=reviewer,
                        allow=("review", "feedback")):
        correction = getattr(args, "correction", None)  # reject takes none
        if args.action == "accept" and correction is None:  # the user's correction, else the queue's suggestion
            given = store.feedback_for([args.request_id]).get(args.request_id)
            correction = given and given["correction"]
            if not correction:
                correction = next((q["suggested"] for q in latest_queue(root) if q["request_id"] == args.request_id),
                                  None)
        store.review(args.request_id, args.action == "accept", reviewer, args.reason, correction)
    if args.action == "accept":
        print(f"accepted {args.request_id}: {correction!r} joins the next dataset version "
              f"({len(store.accepted(unused_only=True))} accepted corrections wait)")
    else:
        print(f"rejected {args.request_id}")
    return 0
