"""`llmops audit verify|log|policy`: check the audit trail's chain, anchors and the access policy; read its records;
record a change of the access policy."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from llmops.governance import audit
from llmops.registry import versions as registry
from llmops.core.errors import LlmopsError

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
    policy = cmds.add_parser("policy", help="record governance/policy.csv as it is now (who may do what from here on); "
                             "needs `change policy` under the policy last recorded")
    policy.add_argument("--why", required=True, help="why it changed; kept in the record")


def main(args: argparse.Namespace) -> int:
    root = Path.cwd()
    try:
        if args.audit_command == "verify":
            return _verify(root)
        if args.audit_command == "policy":
            record = audit.record_policy(root, args.why)
            print(f"recorded the access policy as record {record.seq} (sha256 {record.detail['sha256'][:12]}...)")
            return 0
        return _log(root, args.action, args.json)
    except LlmopsError as exc:
        print(f"error: audit: {exc}", file=sys.stderr)
        return 1


def _verify(root: Path) -> int:
    verdict = audit.verify(root)
    verdict.problems += [f"registry tag {tag} was made outside llmops (no audit record names it)"
                         for tag in registry.unaudited(root)]
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
            detail = " ".join(f"{k}={v}" for k, v in record.detail.items() if k != "text")  # a policy: its sha256
            print(f"{record.seq:>5}  {record.at[:19]}  {record.who:<16} {record.action:<24} {record.outcome:<7} "
                  f"{record.object}{version}  {detail}".rstrip())
    return 0
