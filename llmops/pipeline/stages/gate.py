"""gate: the release gate. It weighs evaluate, audit_bias and quantize against thresholds in params.

The answer checks are on the headline metric (evaluate.metrics[0]) and against the base: a real
task passes when fine-tuning made it better than the base and did not make another metric worse
beyond gate.max_regression. The bias checks look at the overall figure and at each bias type's
interval.

Every check is written, passed or not, to reports/gate/verdict.json (a DVC metric: value,
threshold, pass/fail) with a manifest beside it. A failing check ends the stage with exit 1
and the failing checks in its message, so the flow run ends Failed and nothing after the
gate runs (push, and later registration and deployment, obey it).
"""

from __future__ import annotations

import json
import operator
from pathlib import Path
from typing import Callable

from pydantic import BaseModel

from llmops.core import dvcyaml, provenance
from llmops.core.config import GateParams, Params
from llmops.core.fs import write_text
from llmops.core.stats import CONFIDENCE, wilson
from llmops.data.datasets import DataError
from llmops.pipeline.repro import StageRun
from llmops.pipeline.stage import StageFailed, run_cli

JUDGED = ("evaluate", "audit_bias", "quantize")  # the stages whose verdicts the gate reads


def inputs(root: str | Path) -> dict[str, Path]:
    """Each judged stage's verdict, its first metrics file as dvc.yaml declares it (gate's deps there too)."""
    return {name: dvcyaml.stage(root, name).verdict for name in JUDGED}


def verdict_path(root: str | Path) -> Path:
    """Where the gate's own verdict goes: its metrics file in dvc.yaml."""
    return dvcyaml.stage(root, "gate").verdict


class Check(BaseModel):
    name: str  # the params key of its threshold, gate.<name>
    value: float
    threshold: float
    rule: str  # ">=" or "<="
    passed: bool
    about: str


class Verdict(BaseModel):
    passed: bool
    release_candidate: str
    checks: list[Check]

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]


RULES: dict[str, Callable[[float, float], bool]] = {">=": operator.ge, "<=": operator.le}


def _check(name: str, value: float, rule: str, cfg: GateParams, about: str) -> Check:
    threshold = float(getattr(cfg, name))
    return Check(name=name, value=value, threshold=threshold, rule=rule, passed=RULES[rule](value, threshold),
                 about=about)


def _score(scores: dict, metric: str) -> float:
    return scores["metrics"][metric]["value"]


def _proportion(tuned: dict, base: dict, task: str, metric: str) -> bool:
    """Whether a harness metric is one max_regression's bound is in units of: a share (0-1, as accuracy), higher
    better. Others (perplexities, BLEU's 0-100) are reported by evaluate, not gated."""
    values = (tuned["value"], base["harness"][task][metric]["value"])
    return tuned["higher_is_better"] and all(0 <= v <= 1 for v in values)


def _per_type(kind: str, audit: dict, types: int, cfg: GateParams) -> Check:
    """The bias check of one type: how far from 50 (the unbiased ideal) the nearest point of its interval lies.

    A type's pairs are few (the demo has 16 to 20), and a bootstrap of 16 pairs that all lean one way is the
    degenerate [0, 0]: the interval is Wilson's, on the count of pairs that prefer the stereotype, at a family-wise
    95% over the types judged (Bonferroni: each at 1 - 0.05 / types), so that six types are not six chances of a
    false alarm, and a type fails when its data put it beyond the bound even so.
    """
    pairs = audit["pairs"]
    confidence = 1 - (1 - CONFIDENCE) / types
    ci = wilson(round(audit["pct_stereotype"] * pairs / 100), pairs, confidence)
    low, high = 100 * ci.low, 100 * ci.high
    nearest = 0.0 if low <= 50 <= high else min(abs(low - 50), abs(high - 50))
    return _check("max_stereotype_deviation_per_type", nearest, "<=", cfg,
                  f"{kind}: pct_stereotype {audit['pct_stereotype']:.1f} of {pairs} pairs, {confidence:.2%} Wilson "
                  f"interval {low:.1f}-{high:.1f} (family-wise 95% over {types} types): how far from 50 its nearest "
                  "point is")


def decide(cfg: GateParams, ev: dict, audit: dict, quant: dict) -> Verdict:
    """The verdict on the metrics of evaluate, audit_bias and quantize (their metrics.json as dicts)."""
    tuned, base, baseline = ev["finetuned"], ev["base"], ev["baseline"]
    head = ev["headline"]
    deviation = abs(audit["finetuned"]["pct_stereotype"] - 50)
    checks = [
        _check("min_score", _score(tuned, head), ">=", cfg, f"fine-tuned {head} on the eval split"),
        _check("min_gain_over_base", _score(tuned, head) - _score(base, head), ">=", cfg,
               f"fine-tuned minus base {head}"),
        _check("min_gain_over_baseline", _score(tuned, head) - _score(baseline, head), ">=", cfg,
               f"fine-tuned {head} minus the most-frequent-answer baseline's"),
        *(_check("max_regression", _score(base, m) - _score(tuned, m), "<=", cfg, f"base minus fine-tuned {m}")
          for m in tuned["metrics"] if m != head),
        *(_check("max_regression", base["harness"][task][m]["value"] - s["value"], "<=", cfg,
                 f"base minus fine-tuned {task} {m} (lm-evaluation-harness)")
          for task, ms in tuned.get("harness", {}).items() for m, s in ms.items() if _proportion(s, base, task, m)),
        _check("max_perplexity", tuned["perplexity"], "<=", cfg, "fine-tuned perplexity on the eval split"),
        _check("max_stereotype_deviation", deviation, "<=", cfg, "|pct_stereotype - 50| of the fine-tuned model"),
        _check("max_stereotype_increase", deviation - abs(audit["base"]["pct_stereotype"] - 50), "<=", cfg,
               "increase of |pct_stereotype - 50| over the base model, in points"),
        *(_per_type(kind, a, len(audit["finetuned_by_type"]), cfg)
          for kind, a in sorted(audit.get("finetuned_by_type", {}).items())),
    ]
    if cfg.release_candidate != "none":
        q = quant["methods"][cfg.release_candidate]
        checks += [
            _check("max_quantized_exact_match_drop", -q["exact_match_change"], "<=", cfg,
                   f"exact match lost by {cfg.release_candidate} vs unquantized"),
            _check("max_quantized_perplexity_increase", q["perplexity_change_ratio"], "<=", cfg,
                   f"relative perplexity increase of {cfg.release_candidate} vs unquantized"),
        ]
    return Verdict(passed=all(c.passed for c in checks), release_candidate=cfg.release_candidate, checks=checks)


def describe(check: Check) -> str:
    return f"gate.{check.name}: {check.value:.4g} (needs {check.rule} {check.threshold:.4g}; {check.about})"


def read_reports(root: Path, reports: dict[str, Path]) -> dict[str, dict]:
    """Each stage's JSON report, by stage name.

    Raises:
        DataError: a report is missing (its stage has not run).
    """
    found = {}
    for stage, path in reports.items():
        if not (root / path).is_file():
            raise DataError(f"{path}: no such file; run the {stage} stage first (`llmops run`)")
        found[stage] = json.loads((root / path).read_text())
    return found


def run_gate(params: Params, root: str | Path = ".") -> Verdict:
    """Decide; write verdict.json and its manifest whatever the outcome.

    Raises:
        DataError: a stage's metrics are missing (the stage has not run).
        StageFailed: a check failed; the message lists every failing check.
    """
    root = Path(root)
    judged, path = inputs(root), root / verdict_path(root)
    metrics = read_reports(root, judged)
    verdict = decide(params.gate, metrics["evaluate"], metrics["audit_bias"], metrics["quantize"])
    write_text(path, json.dumps(verdict.model_dump(), indent=2) + "\n")
    provenance.write_report_manifest(path.parent, params.gate, root, data=list(judged.values()))
    if not verdict.passed:
        raise StageFailed(f"{len(verdict.failed)} of {len(verdict.checks)} release checks failed:\n"
                          + "\n".join(describe(c) for c in verdict.failed))
    return verdict


def _cli_body(params: Params) -> str:
    verdict = run_gate(params)
    return (f"gate: all {len(verdict.checks)} release checks passed; release candidate: {verdict.release_candidate}"
            f"\n-> {verdict_path('.')}")


def main() -> int:
    return run_cli("gate", _cli_body)


def summary(verdict: Verdict, previous: dict | None) -> str:
    return f"Release gate: passed all {len(verdict.checks)} checks; release candidate: {verdict.release_candidate}"


def _artifact(root: Path, ran: str) -> Verdict | None:
    from prefect.artifacts import create_table_artifact  # (only a flow publishes)
    path = root / verdict_path(root)
    if not path.is_file():
        return None
    verdict = Verdict.model_validate_json(path.read_text())
    create_table_artifact(
        key="gate",
        table=[{"check": f"gate.{c.name}", "value": round(c.value, 6), "rule": c.rule, "threshold": c.threshold,
                "result": "pass" if c.passed else "FAIL", "what": c.about} for c in verdict.checks],
        description=(f"**release gate** ({ran}): {'PASSED' if verdict.passed else 'FAILED'}; "
                     f"release candidate `{verdict.release_candidate}`"),
    )
    return verdict


def publish(root: Path, run: StageRun) -> Verdict | None:
    return _artifact(root, "cached, unchanged" if run.skipped else "ran")


def publish_failed(root: Path, stage: str) -> None:
    """A refused release still shows every check, so a person sees what to fix."""
    _artifact(root, "ran")
