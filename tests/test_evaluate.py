"""evaluate: the baseline it reports, and the intervals around every figure."""

from __future__ import annotations

import json
import math

import pytest

from llmops.metrics import normalise
from llmops.stats import wilson
from tasks.evaluate import majority_answers


def test_wilson_interval_is_the_textbook_formula():
    z = 1.959963984540054  # the 97.5% normal quantile
    for k, n in [(0, 10), (8, 200), (113, 200), (34, 34)]:
        p = k / n
        center = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
        ci = wilson(k, n)
        assert (ci.low, ci.high) == pytest.approx((max(0.0, center - half), min(1.0, center + half)), abs=1e-9)


def test_the_baseline_answers_each_task_with_its_most_frequent_training_answer():
    rows = [{"task": "a", "response": "1"}, {"task": "a", "response": " 2 "}, {"task": "a", "response": "2"},
            {"task": "b", "response": "x"}, {"response": "free text"}]
    assert majority_answers(rows) == {"a": "2", "b": "x", "all": "free text"}


@pytest.mark.services
@pytest.mark.training
def test_metrics_carry_intervals_and_a_baseline_that_the_samples_reproduce(pipeline):
    metrics = json.loads((pipeline / "reports/evaluate/metrics.json").read_text())
    samples = [json.loads(line) for line in (pipeline / "reports/evaluate/samples.jsonl").read_text().splitlines()]
    for model in ("base", "finetuned"):
        s = metrics[model]
        assert s["perplexity_ci95"]["low"] <= s["perplexity"] <= s["perplexity_ci95"]["high"]
        hits = sum(normalise(r[model]) == normalise(r["reference"]) for r in samples)
        assert s["exact_match"] == hits / len(samples)  # full precision, not rounded
        assert s["exact_match_ci95"] == wilson(hits, len(samples)).model_dump()
        assert s["metrics"]["exact_match"] == {"value": s["exact_match"], "ci95": s["exact_match_ci95"]}
    answers = metrics["baseline"]["answers"]
    hits = sum(normalise(answers.get(r["task"], "")) == normalise(r["reference"]) for r in samples)
    assert metrics["baseline"]["exact_match"] == hits / len(samples)
    assert metrics["headline"] == "exact_match"
    assert set(metrics["by_task"]) == {r["task"] for r in samples}
    for task in metrics["by_task"].values():
        for key in ("base", "finetuned", "baseline"):
            assert task[f"{key}_ci95"]["low"] <= task[key] <= task[f"{key}_ci95"]["high"]
    manifest = json.loads((pipeline / "reports/evaluate/manifest.json").read_text())
    assert set(manifest["models"]) == {"base", "adapter"} and manifest["git"]["commit"]
    assert all(len(h) == 64 for h in manifest["models"]["adapter"]["sha256"].values())
