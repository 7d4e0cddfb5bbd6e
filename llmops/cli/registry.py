"""`llmops registry ...`: list, show, lineage, history, register, promote, rollback, pull."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from llmops.cli import output
from llmops.core.errors import LlmopsError
from llmops.registry import versions as registry
from llmops.serving import instances as servers


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "registry", help="model versions, their lineage, and the stages (staging, production) they hold",
        description="The model registry: GTO git tags on commits whose dvc.lock pins models/release/. "
        "Works from a fresh clone (the tags come with it, the files from the DVC remote).")
    cmds = parser.add_subparsers(dest="registry_command", required=True, metavar="ACTION")
    listing = cmds.add_parser("list", help="every version, newest first, with its stages and headline scores")
    output.add_json(listing, "one JSON object per version and line (as `show --json` prints it)")
    show = cmds.add_parser("show", help="one version's model card, with its registry history (--json: its record)")
    show.add_argument("version", help="e.g. v3 or v3.0.0, or a stage: production")
    output.add_json(show, "the version's record (lineage, who, why) as one JSON document")
    show.add_argument("--html", metavar="FILE", help="also write the card as a self-contained HTML page")
    lineage = cmds.add_parser("lineage", help="the chain from the data files to the version and its stages")
    lineage.add_argument("version", help="e.g. v3, or a stage: production")
    output.add_json(lineage, "one JSON document: the version's record, its data and models (outs), its stage "
                    "events and the servers serving it")
    hist = cmds.add_parser("history", help="every registration and stage change: when, who, why")
    hist.add_argument("--stage", choices=registry.STAGES)
    output.add_json(hist, "one JSON object per event and line")
    reg = cmds.add_parser("register", help="register models/release/ (what the gate passed) as the next version")
    reg.add_argument("--why", default="registered by hand", help="kept in the version's record")
    promote = cmds.add_parser("promote", help="give a version a stage (the current holder is unassigned)")
    promote.add_argument("version")
    promote.add_argument("--to", dest="stage", choices=registry.STAGES, required=True)
    promote.add_argument("--why", required=True, help="kept in the stage history")
    back = cmds.add_parser("rollback", help="give a stage back to the version that held it before")
    back.add_argument("--stage", choices=registry.STAGES, default="production")
    back.add_argument("--why", required=True, help="kept in the stage history")
    canary = cmds.add_parser(
        "canary", help="give a version a share of production's traffic; promote it to production, or drop it",
        description="`canary V --share 10`: V answers 10%% of the requests for production (sticky per user or API "
        "key), on servers started with --adapters; `canary promote`: it takes production; `canary drop`: it "
        "stops (the server also drops it by itself when its error rate or latency exceeds production's by "
        "deploy.canary_*).")
    canary.add_argument("target", help="a version, or: promote, drop")
    canary.add_argument("--share", type=float, help="percent of production's requests (0-100, exclusive)")
    canary.add_argument("--why", required=True, help="kept in the stage history")
    pull = cmds.add_parser("pull", help="download a version's files (byte-identical) from the DVC remote")
    pull.add_argument("ref", help="a version (v3) or a stage (production)")
    pull.add_argument("-o", "--out", help="destination directory (default: model-<version>)")


def main(args: argparse.Namespace) -> int:
    root = Path.cwd()
    try:
        if args.registry_command in _READS:
            warning = registry.refresh(root)
            if warning:
                print(warning, file=sys.stderr)
        output.show(_ACTIONS[args.registry_command](root, args))
    except LlmopsError as exc:  # the registry's own, the access policy's, the audit trail's
        print(f"error: registry: {exc}", file=sys.stderr)
        return 1
    return 0


def _headline(v: registry.Version) -> str:
    ev = v.lineage.get("scores", {}).get("evaluate", {})
    em = f"exact match {ev['exact_match']:.1%}" if "exact_match" in ev else "no scores"
    return f"{v.lineage.get('variant', '?')}, {em}"


def _list(root: Path, args) -> str:
    found = registry.versions(root)
    if args.json:
        return output.json_lines(map(_record, found))
    if not found:
        return "no versions registered yet (a run that passes the gate registers one)"
    return output.table(["VERSION", "STAGES", "CREATED", "AUTHOR", "SCORES"], (
        [v.version, ",".join(v.stages), v.created_at[:19], v.author, _headline(v)] for v in found))


def _record(v: registry.Version) -> dict:
    return {"version": v.version, "commit": v.commit, "created_at": v.created_at, "stages": v.stages, **v.record}


def _show(root: Path, args) -> str:
    v = registry.resolve(root, args.version)
    if args.json:
        return json.dumps(_record(v), indent=2)
    from llmops.registry import model_card

    card = registry.card(root, v) + model_card.registry_section(v, registry.history(root))
    if args.html:
        Path(args.html).write_text(model_card.to_html(card, f"Model card: {registry.ARTIFACT} {v.version}"))
    return card.rstrip("\n")


def _lineage(root: Path, args) -> str:
    v = registry.resolve(root, args.version)
    lin = v.lineage
    outs = [{"stage": name, "path": out["path"], "md5": out["md5"]}
            for name, stage in registry.locked_stages(root, v.commit).items() for out in stage.get("outs", [])
            if out.get("md5") and out["path"].startswith(("data/", "models/"))]  # the data and weights, not reports
    events = [e for e in registry.history(root) if e["version"] == v.version and e["event"] != "registration"]
    serving = [s for s in servers.running(root) if s.version == v.version]
    if args.json:
        return json.dumps({**_record(v), "outs": outs, "events": events,
                           "served": [{"url": s.url, "since": s.loaded, "pid": s.pid, "follows": s.ref}
                                      for s in serving]}, indent=2)
    lines = [f"data and models (dvc.lock of commit {v.commit[:12]}):"]
    lines += [f"  {o['stage']:<16} -> {o['path']} (md5 {o['md5']})" for o in outs]
    gate = lin.get("gate", {})
    ev = lin.get("scores", {}).get("evaluate", {})
    audit = lin.get("scores", {}).get("audit_bias", {})
    lines += [
        f"  -> {registry.ARTIFACT} {v.version}: {lin.get('variant')}, registered {v.created_at[:19]} by "
        f"{v.record.get('by', v.author)} ({v.record.get('why', '')})",
        f"     code commit {str(lin.get('code_commit'))[:12]}; parent version {lin.get('parent_version') or 'none'}",
        f"     gate {'passed' if gate.get('passed') else 'FAILED'} "
        f"{sum(c['passed'] for c in gate.get('checks', []))}/{len(gate.get('checks', []))}; "
        f"exact match {ev.get('exact_match', float('nan')):.1%}, perplexity {ev.get('perplexity', float('nan')):.3f}, "
        f"pct_stereotype {audit.get('pct_stereotype', float('nan')):.1f}",
    ]
    lines += [f"  -> {e['event']} {e['stage']} {e['time'][:19]} by {e['by']}: {e['why']}" for e in events]
    lines.append(f"  -> holds now: {', '.join(v.stages) or 'no stage'}")
    lines += [f"  -> served at {s.url} since {s.loaded[:19]} (pid {s.pid}, follows {s.ref})" for s in serving]
    if not serving:
        lines.append("  -> served by no server of this project (`llmops serve status`)")
    return "\n".join(lines)


def _history(root: Path, args) -> str:
    events = registry.history(root, args.stage)
    if args.json:
        return output.json_lines(events)
    if not events:
        return "no registry events yet"
    return output.table(["TIME", "EVENT", "VERSION", "STAGE", "BY", "WHY"], (
        [e["time"][:19], e["event"], e["version"], e["stage"], e["by"], e["why"]] for e in events))


def _register(root: Path, args) -> str:
    v, new = registry.register(root, args.why)
    return f"registered {registry.ARTIFACT} {v.version}" if new else f"unchanged: this release is already {v.version}"


def _promote(root: Path, args) -> str:
    before = registry.promote(root, args.version, args.stage, args.why)
    target = registry.normalize(args.version)
    return "\n".join([f"{args.stage}: {before.version if before else 'none'} -> {target}", *_follow(root, args.stage)])


def _rollback(root: Path, args) -> str:
    current, previous = registry.rollback(root, args.stage, args.why)
    return "\n".join([f"{args.stage}: rolled back {current.version} -> {previous.version}",
                      *_follow(root, args.stage)])


def _canary(root: Path, args) -> str:
    if args.target in ("promote", "drop"):
        if args.share is not None:
            raise LlmopsError(f"canary {args.target} takes no --share")
        held = registry.canary(root)
        if held is None:
            raise LlmopsError("no version holds canary")
        if args.target == "promote":
            before = registry.promote(root, held.version.version, "production", f"canary promoted: {args.why}")
        registry.drop(root, "canary", args.why if args.target == "drop" else f"promoted to production: {args.why}")
        done = (f"production: {before.version if before else 'none'} -> {held.version.version}; no canary"
                if args.target == "promote" else f"canary {held.version.version} dropped")
        return "\n".join([done, *_follow(root, "production")])
    if args.share is None:
        raise LlmopsError("canary VERSION needs --share PERCENT (its part of production's traffic)")
    before = registry.promote(root, args.target, "canary", args.why, share=args.share)
    target = registry.normalize(args.target)
    return "\n".join([f"canary: {before.version if before else 'none'} -> {target} at {args.share:g}% of "
                      "production's traffic", *_follow(root, "production")])


def _follow(root: Path, stage: str) -> list[str]:
    """Reload this project's running servers that follow the stage, so that they serve its new holder."""
    lines = []
    for server in servers.running(root):
        if server.ref == stage:
            try:
                lines.append(f"{server.url} now serves {servers.reload(root, server, 600).version}")
            except servers.ServerError as exc:
                lines.append(f"warning: {exc}")
    return lines


def _pull(root: Path, args) -> str:
    target = registry.resolve(root, args.ref)
    out = Path(args.out or f"model-{target.version}")
    registry.pull(root, target.version, out)
    return f"{target.version} -> {out}/"


_READS = ("list", "show", "lineage", "history")
_ACTIONS = {"list": _list, "show": _show, "lineage": _lineage, "history": _history, "register": _register,
            "promote": _promote, "rollback": _rollback, "canary": _canary, "pull": _pull}
