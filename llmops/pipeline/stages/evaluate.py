"""evaluate: the fine-tuned model against its base, and against a trivial baseline, on the held-out eval split.

Measures, on the same examples, each with a 95% interval:

- perplexity: exp of the mean negative log-likelihood of the final answer's tokens (with the
  chat template's end of turn) given the conversation before it, over all eval examples,
  token-weighted; interval: seeded percentile bootstrap over examples. Each example is its own
  window of at most the model's context; a longer one has the start of its conversation cut,
  so every answer token is scored with as much of its prompt as fits.
- the answer metrics of `evaluate.metrics` (llmops/evaluation/metrics.py: exact_match, numeric, chrf) on
  the greedy answer (generated from the conversation rendered through the chat template, until
  the end of the turn or max_new_tokens); the first is the headline the gate judges. Exact match
  is always reported, overall and per task family; interval: Wilson (binary metrics) or bootstrap.
- baseline: each metric of answering each task family's most frequent training answer.
  A model that does not beat it has learned nothing the answer distribution did not give away.
- the lm-evaluation-harness tasks of `evaluate.harness_tasks` (llmops/evaluation/harness.py), each metric for
  both models with lm-eval's standard error as a 95% interval.

Outputs: reports/evaluate/metrics.json (full precision; `dvc metrics show`, `dvc metrics diff`),
reports/evaluate/samples.jsonl (every prompt with both models' answers) and manifest.json.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path

from pydantic import BaseModel

from llmops.core import provenance
from llmops.core.config import EvaluateParams, Params
from llmops.core.fs import write_text
from llmops.core.stats import Interval, bootstrap, wilson
from llmops.data.datasets import DataError, read_jsonl, write_jsonl
from llmops.evaluation import harness, inference, metrics
from llmops.evaluation.harness import HarnessScore
from llmops.pipeline.repro import StageRun
from llmops.pipeline.stage import run_cli

EVAL_DATA = Path("data/prepared/eval.jsonl")
TRAIN_DATA = Path("data/prepared/train.jsonl")
OUT_DIR = Path("reports/evaluate")


class Score(BaseModel):
    value: float  # the mean over examples, 0-1
    ci95: Interval


class Scores(BaseModel):
    perplexity: float
    perplexity_ci95: Interval
    exact_match: float
    exact_match_ci95: Interval
    examples: int
    metrics: dict[str, Score] = {}  # each of evaluate.metrics
    harness: dict[str, dict[str, HarnessScore]] = {}  # evaluate.harness_tasks: task -> metric


class TaskScores(BaseModel):
    examples: int
    base: float
    base_ci95: Interval
    finetuned: float
    finetuned_ci95: Interval
    baseline: float
    baseline_ci95: Interval


class Baseline(BaseModel):
    exact_match: float
    exact_match_ci95: Interval
    answers: dict[str, str]  # task -> its most frequent training answer
    metrics: dict[str, Score] = {}


class EvalResult(BaseModel):
    base_model: str
    headline: str = "exact_match"  # evaluate.metrics[0]: what the gate judges
    base: Scores
    finetuned: Scores
    baseline: Baseline
    by_task: dict[str, TaskScores]


def _task(row: dict) -> str:
    return row.get("task") or "all"


def majority_answers(train_rows: list[dict]) -> dict[str, str]:
    """Each task family's most frequent training response (ties: the first seen)."""
    counts: dict[str, Counter] = defaultdict(Counter)
    for row in train_rows:
        counts[_task(row)][row["response"].strip()] += 1
    return {task: c.most_common(1)[0][0] for task, c in sorted(counts.items())}


def score(name: str, answers: list[str], rows: list[dict], cfg: EvaluateParams) -> Score:
    """The metric `name` of the answers against the rows' responses, with its 95% interval."""
    import numpy as np

    values = metrics.scores(name, answers, [r["response"] for r in rows])
    if metrics.METRICS[name].binary:
        ci = wilson(int(sum(values)), len(values))
    else:
        ci = bootstrap((values,), lambda v, axis: np.mean(v, axis=axis), cfg.bootstrap_resamples, cfg.seed)
    return Score(value=sum(values) / len(values), ci95=ci)


def _scores(loaded: inference.Loaded, rows: list[dict], params: Params, root: Path) -> tuple[Scores, list[str]]:
    import numpy as np

    cfg = params.evaluate
    logprobs = inference.response_logprobs(loaded, rows, cfg.batch_size)
    ppl_ci = bootstrap(
        ([s for s, _ in logprobs], [n for _, n in logprobs]),
        lambda lp, n, axis: np.exp(-lp.sum(axis=axis) / n.sum(axis=axis)), cfg.bootstrap_resamples, cfg.seed)
    answers = inference.greedy_answers(loaded, inference.contexts(rows), cfg.max_new_tokens, cfg.batch_size)
    scored = {name: score(name, answers, rows, cfg) for name in dict.fromkeys(["exact_match", *cfg.metrics])}
    exact = scored["exact_match"]  # always reported, whatever evaluate.metrics lists
    tasks = harness.score(loaded.model, loaded.tokenizer, cfg.harness_tasks, root, cfg.max_examples, cfg.batch_size,
                          cfg.bootstrap_resamples, cfg.seed) if cfg.harness_tasks else {}
    scores = Scores(perplexity=inference.perplexity(logprobs), perplexity_ci95=ppl_ci,
                    exact_match=exact.value, exact_match_ci95=exact.ci95, examples=len(rows),
                    metrics={name: scored[name] for name in cfg.metrics}, harness=tasks)
    return scores, answers


def run_evaluate(params: Params, root: str | Path = ".") -> EvalResult:
    """Score the base model, the fine-tuned adapter and the baseline; write metrics, samples and a manifest.

    Raises:
        DataError: the eval or train split is missing or empty.
        ModelError: the base model or the fine-tuned adapter is missing or damaged.
    """
    root = Path(root)
    for split in (EVAL_DATA, TRAIN_DATA):
        if not (root / split).is_file():
            raise DataError(f"{split}: no such file; run `llmops run` (or `dvc pull` in a fresh clone)")
    rows = read_jsonl(root / EVAL_DATA)[: params.evaluate.max_examples]
    majority = majority_answers(read_jsonl(root / TRAIN_DATA))
    harness.check(params.evaluate.harness_tasks, root, params.train.finetune.method)  # before any model loads
    loaded = inference.load_finetuned(params, root)
    with loaded.model.disable_adapter():
        base, base_answers = _scores(loaded, rows, params, root)
    tuned, tuned_answers = _scores(loaded, rows, params, root)

    baseline_answers = [majority.get(_task(row), "") for row in rows]
    matches = zip(*(inference.exact_matches(answers, rows)
                    for answers in (base_answers, tuned_answers, baseline_answers)))
    per_task: dict[str, list[tuple[bool, bool, bool]]] = defaultdict(list)
    samples = []
    for row, a, b, hits in zip(rows, base_answers, tuned_answers, matches):
        per_task[_task(row)].append(hits)
        samples.append({"prompt": row["prompt"], "task": _task(row), "reference": row["response"], "base": a,
                        "finetuned": b})
    by_task = {}
    for name, hits in sorted(per_task.items()):
        n, (base_k, tuned_k, baseline_k) = len(hits), (sum(h[i] for h in hits) for i in range(3))
        by_task[name] = TaskScores(
            examples=n, base=base_k / n, base_ci95=wilson(base_k, n), finetuned=tuned_k / n,
            finetuned_ci95=wilson(tuned_k, n), baseline=baseline_k / n, baseline_ci95=wilson(baseline_k, n))
    baseline_hits = sum(h[2] for hits in per_task.values() for h in hits)
    cfg = params.evaluate
    result = EvalResult(
        base_model=params.train.finetune.base_model, headline=cfg.metrics[0], base=base, finetuned=tuned,
        by_task=by_task,
        baseline=Baseline(exact_match=baseline_hits / len(rows), exact_match_ci95=wilson(baseline_hits, len(rows)),
                          answers=majority,
                          metrics={name: score(name, baseline_answers, rows, cfg) for name in cfg.metrics}),
    )
    out = root / OUT_DIR
    write_jsonl(out / "samples.jsonl", samples)
    write_text(out / "metrics.json", json.dumps(result.model_dump(), indent=2) + "\n")
    provenance.write_report_manifest(out, params.evaluate, root, data=[EVAL_DATA, TRAIN_DATA],
                                     models={"base": loaded.base_path, "adapter": inference.ADAPTER})
    return result


def _metric_line(scores: Scores | Baseline) -> str:
    return ", ".join(f"{name} {m.value:.1%} (95% CI {m.ci95.low:.1%}-{m.ci95.high:.1%})"
                     for name, m in scores.metrics.items())


def _harness_lines(r: EvalResult) -> str:
    def shown(s: HarnessScore) -> str:
        return f"{s.value:.4g}" + (f" (95% CI {s.ci95.low:.4g}-{s.ci95.high:.4g})" if s.ci95 else "")

    return "".join(f"  {task} {metric} (lm-evaluation-harness): base {shown(r.base.harness[task][metric])} -> "
                   f"fine-tuned {shown(tuned)}\n"
                   for task, metrics in r.finetuned.harness.items() for metric, tuned in metrics.items())


def _cli_body(params: Params) -> str:
    r = run_evaluate(params)
    return (
        f"evaluate: {r.base.examples} eval examples\n"
        f"  base ({r.base_model}): perplexity {r.base.perplexity:.3f}, {_metric_line(r.base)}\n"
        f"  fine-tuned: perplexity {r.finetuned.perplexity:.3f}, {_metric_line(r.finetuned)}\n"
        f"  baseline (each task's most frequent training answer): {_metric_line(r.baseline)}\n"
        f"{_harness_lines(r)}"
        f"-> {OUT_DIR}/metrics.json"
    )


def main() -> int:
    return run_cli("evaluate", _cli_body)


def summary(r: EvalResult, previous: dict | None) -> str:
    was = ("", "")
    if previous and "finetuned" in previous:
        was = (f"   (previous run: {previous['finetuned']['perplexity']:.3f})",
               f"   (previous run: {previous['finetuned']['exact_match']:.1%})")
    lines = [f"Eval split ({r.base.examples} examples), base '{r.base_model}' -> fine-tuned:",
             f"  perplexity  {r.base.perplexity:.3f} -> {r.finetuned.perplexity:.3f}{was[0]}",
             f"  exact match {r.base.exact_match:.1%} -> {r.finetuned.exact_match:.1%}{was[1]}"
             f"   (baseline: {r.baseline.exact_match:.1%})"]
    lines += [f"  {name} {r.base.metrics[name].value:.1%} -> {m.value:.1%}   (baseline: "
              f"{r.baseline.metrics[name].value:.1%})" for name, m in r.finetuned.metrics.items() if name != "exact_match"]
    return "\n".join(lines)


def publish(root: Path, run: StageRun) -> EvalResult:
    """Base vs fine-tuned, overall and per task, as a table."""
    from prefect.artifacts import create_table_artifact  # (only a flow publishes)
    result = EvalResult.model_validate_json((root / OUT_DIR / "metrics.json").read_text())
    def ci(i: Interval) -> str:
        return f"{i.low:.4g} to {i.high:.4g}"

    b, f = result.base, result.finetuned
    table = [
        {"metric": "perplexity", "base": b.perplexity, "base 95% CI": ci(b.perplexity_ci95),
         "finetuned": f.perplexity, "finetuned 95% CI": ci(f.perplexity_ci95), "baseline": None},
        {"metric": "exact_match", "base": b.exact_match, "base 95% CI": ci(b.exact_match_ci95),
         "finetuned": f.exact_match, "finetuned 95% CI": ci(f.exact_match_ci95),
         "baseline": result.baseline.exact_match},
    ] + [
        {"metric": f"exact_match[{name}] ({t.examples})", "base": t.base, "base 95% CI": ci(t.base_ci95),
         "finetuned": t.finetuned, "finetuned 95% CI": ci(t.finetuned_ci95), "baseline": t.baseline}
        for name, t in result.by_task.items()
    ]
    create_table_artifact(
        key="evaluate", table=table,
        description=(
            f"**evaluate** ({'cached, unchanged' if run.skipped else 'ran'}) on {result.base.examples} eval examples: "
            f"fine-tuned vs base `{result.base_model}`"
        ),
    )
    return result
