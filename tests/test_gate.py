"""The release gate: every threshold can stop a release, and the verdict says which and why."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import BIN, REPO, run, set_params
from llmops.core.config import ConfigError, load_params
from llmops.pipeline.stage import StageFailed
from llmops.pipeline.stages.gate import inputs, run_gate

# A release that passes the default thresholds, with each figure a step away from its threshold.
def _scored(**values: float) -> dict:
    return {"metrics": {name: {"value": v, "ci95": {"low": v, "high": v}} for name, v in values.items()}}


GOOD = {
    "evaluate": {"headline": "numeric", "finetuned": {**_scored(numeric=0.6, chrf=0.5), "perplexity": 3.0},
                 "base": _scored(numeric=0.1, chrf=0.52), "baseline": _scored(numeric=0.2, chrf=0.1)},
    "audit_bias": {"finetuned": {"pct_stereotype": 55.0}, "base": {"pct_stereotype": 52.0},
                   "finetuned_by_type": {
                       "gender": {"pct_stereotype": 70.0, "pairs": 50}, "age": {"pct_stereotype": 40.0, "pairs": 10}}},
    "quantize": {"methods": {"int8_weight_only": {"exact_match_change": -0.01, "perplexity_change_ratio": 0.02}}},
}
# threshold -> a value for it that this release no longer meets (the headline is numeric: chrF fell by 0.02, and
# gender's 35 of 50 pairs have a 97.5% Wilson interval (two types) of 54.2-82.1, 4.2 points from 50)
FAILING = {
    "min_score": 0.7, "min_gain_over_base": 0.6, "min_gain_over_baseline": 0.45, "max_regression": 0.01,
    "max_perplexity": 2.5, "max_stereotype_deviation": 4.0, "max_stereotype_increase": 2.0,
    "max_stereotype_deviation_per_type": 4.0, "max_quantized_exact_match_drop": 0.005,
    "max_quantized_perplexity_increase": 0.01,
}
CHECKS = len(FAILING) + 1  # one bias check per type


def _project(tmp_path: Path, metrics: dict) -> Path:
    shutil.copy(REPO / "dvc.yaml", tmp_path)  # where the gate reads which files hold each stage's verdict
    for stage, path in inputs(tmp_path).items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(json.dumps(metrics[stage]))
    return tmp_path


def test_the_defaults_pass_a_good_release(tmp_path):
    verdict = run_gate(load_params(REPO / "params.yaml"), _project(tmp_path, GOOD))
    assert verdict.passed and {c.name for c in verdict.checks} == set(FAILING)
    saved = json.loads((tmp_path / "reports/gate/verdict.json").read_text())
    assert saved["passed"] and all(c["passed"] for c in saved["checks"])
    assert json.loads((tmp_path / "reports/gate/manifest.json").read_text())["params"]["min_score"] == 0.4


@pytest.mark.parametrize("threshold", sorted(FAILING))
def test_each_threshold_fails_the_gate_alone(tmp_path, threshold):
    params = load_params(REPO / "params.yaml", [f"gate.{threshold}={FAILING[threshold]}"])
    with pytest.raises(StageFailed) as exc:
        run_gate(params, _project(tmp_path, GOOD))
    assert str(exc.value).startswith(f"1 of {CHECKS} release checks failed:\ngate.{threshold}: ")
    verdict = json.loads((tmp_path / "reports/gate/verdict.json").read_text())
    assert not verdict["passed"]
    assert [c["name"] for c in verdict["checks"] if not c["passed"]] == [threshold]
    check = next(c for c in verdict["checks"] if c["name"] == threshold)
    assert check["threshold"] == FAILING[threshold] and isinstance(check["value"], float)


def test_without_a_quantized_candidate_the_quantization_checks_are_not_made(tmp_path):
    params = load_params(REPO / "params.yaml", ["gate.release_candidate=none", "quantize.methods=[]"])
    verdict = run_gate(params, _project(tmp_path, {**GOOD, "quantize": {"methods": {}}}))
    assert verdict.passed and "max_quantized_exact_match_drop" not in {c.name for c in verdict.checks}


@pytest.mark.parametrize("overrides, message", [
    (["gate.release_candidate=fp8"], "-S gate.release_candidate: 'fp8' is not one of quantize.methods"),
    (["quantize.methods=[nf4]", "gate.release_candidate=int8_weight_only"],
     "gate.release_candidate: 'int8_weight_only' is not one of quantize.methods (nf4)"),
    (["gate.min_score=1.5"], "-S gate.min_score: Input should be less than or equal to 1"),
    (["gate.max_stereotype_deviation=-1"], "-S gate.max_stereotype_deviation: Input should be greater than"),
    (["quantize.methods=[gptq]"], "-S quantize.methods.0: Input should be"),
])
def test_contradicting_or_impossible_thresholds_are_refused(overrides, message):
    with pytest.raises(ConfigError) as exc:
        load_params(REPO / "params.yaml", overrides)
    assert message in str(exc.value)


def test_missing_metrics_name_the_stage_to_run(tmp_path):
    from llmops.data.datasets import DataError

    (tmp_path / "reports").mkdir()
    shutil.copy(REPO / "dvc.yaml", tmp_path)
    with pytest.raises(DataError, match=r"reports/evaluate/metrics.json: no such file; run the evaluate stage"):
        run_gate(load_params(REPO / "params.yaml"), tmp_path)


@pytest.mark.services
@pytest.mark.training
def test_gate_cli_on_the_run_pipeline(ran_project):
    proc = run([str(BIN / "llmops"), "gate"], ran_project)
    types = json.loads((ran_project / "reports/audit_bias/metrics.json").read_text())["finetuned_by_type"]
    assert f"all {8 + len(types)} release checks passed" in proc.stdout  # one bias check for each type
    set_params(ran_project, "gate.max_perplexity=1.5")
    proc = run([str(BIN / "llmops"), "gate"], ran_project, check=False)
    assert proc.returncode == 1
    checks = len(json.loads((ran_project / "reports/gate/verdict.json").read_text())["checks"])
    assert proc.stderr.startswith(f"error: gate: 1 of {checks} release checks failed:\ngate.max_perplexity: ")
    shown = json.loads(run(["dvc", "metrics", "show", "--json"], ran_project).stdout)
    assert "reports/gate/verdict.json" in json.dumps(shown)


def test_each_bias_type_is_judged_with_its_interval_at_a_family_wise_95_percent():
    """A type whose pairs all lean one way fails once there are enough of them to say so, whatever the overall figure:
    0 of 16 pairs among six types is within 25 points of 50 at 99.17% (Wilson: 0-30.3), 0 of 30 is not (0-18.7)."""
    from llmops.pipeline.stages.gate import decide

    cfg = load_params(REPO / "params.yaml").gate
    def verdict(pairs: int):
        types = {t: {"pct_stereotype": 50.0, "pairs": 20} for t in ("age", "gender", "religion", "race", "disability")}
        audit = {"finetuned": {"pct_stereotype": 41.3}, "base": {"pct_stereotype": 50.0},
                 "finetuned_by_type": {**types, "nationality": {"pct_stereotype": 0.0, "pairs": pairs}}}
        checks = decide(cfg, GOOD["evaluate"], audit, GOOD["quantize"]).checks
        return next(c for c in checks if c.about.startswith("nationality"))

    few, many = verdict(16), verdict(30)
    assert few.passed and few.value == pytest.approx(50 - 30.3, abs=0.1) and "99.17% Wilson interval 0.0-30.3" in few.about
    assert not many.passed and many.value > 25
