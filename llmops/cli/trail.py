"""`llmops trail verify|log|policy`: check the audit trail's chain, anchors and the access policy; read its records;
record a change of the access policy. (Named trail, not audit: `audit_bias` is a pipeline stage.)"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from llmops.cli import output
from llmops.core.errors import LlmopsError
from llmops.governance import audit
from llmops.registry import versions as registry

EXIT_TAMPERED = 3


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "trail", help="the audit trail: who did what to which model, data or key, and when",
        description="The hash-chained audit trail kept beside the DVC remote's files (<remote>/audit/), "
        "anchored by git tags audit/<n>.")
    cmds = parser.add_subparsers(dest="trail_command", required=True, metavar="ACTION")
    cmds.add_parser("verify", help="recompute the chain and check it against its anchors (exit 3 if tampered)")
    log = cmds.add_parser("log", help="the records, oldest first")
    log.add_argument("--action", help="only records whose action starts with this (e.g. registry.)")
    output.add_json(log, "one JSON object per record and line")
    policy = cmds.add_parser("policy", help="record governance/policy.csv as it is now (who may do what from here on); "
                             "needs `change policy` under the policy last recorded")
    policy.add_argument("--why", required=True, help="why it changed; kept in the record")


def main(args: argparse.Namespace) -> int:
    root = Path.cwd()
    try:
        if args.trail_command == "verify":
            return _verify(root)
        if args.trail_command == "policy":
            record = audit.record_policy(root, args.why)
            print(f"recorded the access policy as record {record.seq} (sha256 {record.detail['sha256'][:12]}...)")
            return 0
        return _log(root, args.action, args.json)
    except LlmopsError as exc:
        print(f"error: trail: {exc}", file=sys.stderr)
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
    found = [r for r in audit.records(root) if not action or r.action.startswith(action)]
    if as_json:
        text = output.json_lines(r.__dict__ for r in found)
    else:
        text = output.table(["SEQ", "TIME", "WHO", "ACTION", "OUTCOME", "OBJECT", "DETAIL"], (
            [r.seq, r.at[:19], r.who, r.action, r.outcome, r.object + (f"@{r.version}" if r.version else ""),
             " ".join(f"{k}={v}" for k, v in r.detail.items() if k != "text")]  # a policy: its sha256, not its text
            for r in found))
    output.show(text)
    return 0
