"""evaluate: the baseline it reports, and the intervals around every figure."""

from __future__ import annotations

import json
import math
import re

import pytest

from llmops.evaluation.metrics import normalise
from llmops.core.stats import wilson
from llmops.pipeline.stages.evaluate import majority_answers


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


HARNESS_TASK = """\
task: demo_answers
dataset_path: json
dataset_kwargs:
  data_files:
    test: data/prepared/eval.jsonl
test_split: test
output_type: loglikelihood
doc_to_text: "{{prompt}}"
doc_to_target: "{{response}}"
target_delimiter: ""
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


@pytest.mark.services
@pytest.mark.training
def test_harness_tasks_on_local_data_are_scored_on_both_models_as_we_score_them(ran_project):
    """A task YAML of lm-eval's format on the eval split: lm-eval scores the base and the fine-tuned model (the
    adapter switched off, then on) through the chat template, and its perplexity is what our own log-likelihoods of
    the same text give; the gate judges the share-valued metric against the base."""
    from conftest import BIN, run, set_params
    from llmops.evaluation import inference
    from llmops.core.config import load_params

    (ran_project / "evals").mkdir()
    (ran_project / "evals/answers.yaml").write_text(HARNESS_TASK)
    set_params(ran_project, "evaluate.harness_tasks=[evals/answers.yaml]", "evaluate.max_examples=12")
    out = run([str(BIN / "llmops"), "evaluate"], ran_project).stdout
    assert "demo_answers acc (lm-evaluation-harness): base " in out
    metrics = json.loads((ran_project / "reports/evaluate/metrics.json").read_text())

    loaded = inference.load_finetuned(load_params(ran_project / "params.yaml"), ran_project)
    tok = loaded.tokenizer
    rows = [json.loads(line) for line in (ran_project / "data/prepared/eval.jsonl").read_text().splitlines()][:12]
    items = []
    for row in rows:  # as lm-eval builds a request: the rendered prompt, then the answer, encoded whole and split
        context = tok.apply_chat_template([{"role": "user", "content": row["prompt"]}], tokenize=False,
                                          add_generation_prompt=True)
        whole = tok(context + row["response"], add_special_tokens=False)["input_ids"]
        cut = len(tok(context, add_special_tokens=False)["input_ids"])
        items.append((whole[:cut], whole[cut:]))
    for model in ("base", "finetuned"):
        scores = metrics[model]["harness"]["demo_answers"]
        if model == "base":
            with loaded.model.disable_adapter():
                ours = inference.continuation_logprobs(loaded.model, tok.pad_token_id, items, 4)
        else:
            ours = inference.continuation_logprobs(loaded.model, tok.pad_token_id, items, 4)
        expected = math.exp(-sum(lp for lp, _ in ours) / len(ours))  # lm-eval's: per document, not per token
        assert scores["perplexity"]["value"] == pytest.approx(expected, rel=1e-4)
        assert scores["perplexity"]["higher_is_better"] is False and scores["acc"]["higher_is_better"] is True
        ci = scores["acc"]["ci95"]
        assert ci["low"] <= scores["acc"]["value"] <= ci["high"]
    assert metrics["base"]["harness"]["demo_answers"]["perplexity"]["value"] != \
        metrics["finetuned"]["harness"]["demo_answers"]["perplexity"]["value"]

    verdict = run([str(BIN / "llmops"), "gate"], ran_project, check=False)
    checks = json.loads((ran_project / "reports/gate/verdict.json").read_text())["checks"]
    judged = [c["about"] for c in checks if "lm-evaluation-harness" in c["about"]]
    assert judged == ["base minus fine-tuned demo_answers acc (lm-evaluation-harness)"], verdict.stderr


def test_harness_tasks_that_cannot_run_are_refused_before_any_model_loads(tmp_path):
    from llmops.evaluation import harness
    from llmops.core.config import ConfigError

    (tmp_path / "empty.yaml").write_text("dataset_path: json\n")
    (tmp_path / "broken.yaml").write_text("task: [unclosed\n")
    for entries, method, says in [
            (["broken.yaml"], "lora", "broken.yaml: not a task YAML lm-eval can read"),
            (["missing.yaml"], "lora", "missing.yaml: no such file"),
            (["empty.yaml"], "lora", "empty.yaml: no `task:` name in it"),
            (["no_such_task_anywhere"], "lora", "no_such_task_anywhere: not a task of lm-evaluation-harness"),
            (["empty.yaml"], "prompt_tuning", "cannot score a prompt_tuning adapter")]:
        with pytest.raises(ConfigError, match=re.escape(says)):
            harness.check(entries, tmp_path, method)
