"""`llmops audit verify|log`: check the audit trail's chain and anchors; read its records."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from llmops import audit

EXIT_TAMPERED = 3


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "audit", help="the audit trail: who did what to which model, data or key, and when",
        description="The hash-chained audit trail kept beside the DVC remote's files (<remote>/audit/), "
        "anchored by git tags audit/<n>.")
    cmds = parser.add_subparsers(dest="audit_command", required=True, metavar="ACTION")
    cmds.add_parser("verify", help="recompute the chain and check it against its anchors (exit 3 if tampered)")
    log = cmds.add_parser("log", help="the records, oldest first")
    log.add_argument("--action", help="only records whose action starts with this (e.g. registry.)")
    log.add_argument("--json", action="store_true", help="one JSON record per line")


def main(args: argparse.Namespace) -> int:
    root = Path.cwd()
    try:
        if args.audit_command == "verify":
            return _verify(root)
        return _log(root, args.action, args.json)
    except audit.AuditError as exc:
        print(f"error: audit: {exc}", file=sys.stderr)
        return 1


def _verify(root: Path) -> int:
    verdict = audit.verify(root)
    if verdict.ok:
        print(f"audit trail intact: {verdict.records} records, head {verdict.head or '-'}, "
              f"anchored up to record {verdict.anchored}")
        return 0
    print(f"audit trail TAMPERED ({verdict.records} records):", file=sys.stderr)
    for problem in verdict.problems:
        print(f"  {problem}", file=sys.stderr)
    return EXIT_TAMPERED


def _log(root: Path, action: str | None, as_json: bool) -> int:
    for record in audit.records(root):
        if action and not record.action.startswith(action):
            continue
        if as_json:
            print(json.dumps(record.__dict__, sort_keys=True))
        else:
            version = f"@{record.version}" if record.version else ""
            detail = " ".join(f"{k}={v}" for k, v in record.detail.items())
            print(f"{record.seq:>5}  {record.at[:19]}  {record.who:<16} {record.action:<24} {record.outcome:<7} "
                  f"{record.object}{version}  {detail}".rstrip())
    return 0
