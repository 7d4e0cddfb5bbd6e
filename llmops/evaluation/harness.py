"""lm-evaluation-harness tasks in the evaluate stage: the field's own task definitions, scored on our models.

`evaluate.harness_tasks` names tasks two ways: a task YAML file (lm-eval's format; its data a local file through
`dataset_path: json` and `dataset_kwargs.data_files`, so it runs offline), or the name of a task in lm-eval's own
registry (whose data lm-eval fetches from the dataset hub). Each is scored on the model in hand, which is already
loaded (the base, then the fine-tuned model with its adapter), through the chat template when the tokenizer has
one, as every other metric is; every metric comes with lm-eval's standard error, as a 95% interval.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from llmops.core.config import ConfigError
from llmops.core.stats import Interval
from llmops.data.datasets import DataError

Z95 = 1.959963984540054  # the standard normal quantile of a two-sided 95% interval


def _is_file(entry: str) -> bool:
    return entry.endswith((".yaml", ".yml"))


def _task_name(path: Path) -> str | None:
    """The `task:` a task file defines, read as lm-eval reads it (its !function tags and includes)."""
    import yaml
    from lm_eval.tasks._yaml_loader import load_yaml  # lm-eval's own reader of its format

    try:
        task = load_yaml(path, resolve_func=False).get("task")
    except (OSError, ValueError, ImportError, yaml.YAMLError) as exc:
        raise ConfigError(f"evaluate.harness_tasks: {path}: not a task YAML lm-eval can read: {exc}") from None
    return task if isinstance(task, str) else None


def files(entry: str, root: Path) -> list[Path]:
    """The local files a task reads: its YAML, the YAMLs it includes, and its data files (dataset_kwargs.data_files,
    relative to the project, as lm-eval opens them from there); none for a registry name."""
    if not _is_file(entry) or not (root / entry).is_file():
        return []
    import yaml
    from lm_eval.tasks._yaml_loader import load_yaml

    try:
        task = load_yaml(root / entry, resolve_func=False, recursive=True)
    except (OSError, ValueError, yaml.YAMLError):
        return [root / entry]  # evaluate refuses it, naming why
    data = (task.get("dataset_kwargs") or {}).get("data_files") if isinstance(task, dict) else None
    named = data.values() if isinstance(data, dict) else [data]
    paths = [p for one in named for p in (one if isinstance(one, list) else [one]) if isinstance(p, str)]
    includes = task.get("include") if isinstance(task, dict) else None
    included = [(root / entry).parent / i for i in ([includes] if isinstance(includes, str) else includes or [])]
    return [root / entry, *(p for p in included if p.is_file()), *(root / p for p in paths if (root / p).is_file())]


def check(entries: list[str], root: Path, method: str) -> None:
    """Refuse, before any model is loaded, a task file that is missing or names no task, a registry name lm-eval
    does not know, and a prompt-tuning adapter (`method`), whose virtual tokens shift the logits lm-eval reads.

    Raises:
        ConfigError: naming the entry and why.
    """
    if entries and method == "prompt_tuning":
        raise ConfigError("evaluate.harness_tasks: lm-evaluation-harness cannot score a prompt_tuning adapter (its "
                          "virtual tokens come before the text, where lm-eval reads the logits); use method lora")
    for entry in filter(_is_file, entries):
        path = root / entry
        if not path.is_file():
            raise ConfigError(f"evaluate.harness_tasks: {entry}: no such file (a task YAML in lm-eval's format)")
        if _task_name(path) is None:
            raise ConfigError(f"evaluate.harness_tasks: {entry}: no `task:` name in it (lm-eval's task YAML format)")
    names = [e for e in entries if not _is_file(e)]
    if names:
        from lm_eval.tasks import TaskManager

        known = set(TaskManager().all_tasks)
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ConfigError(f"evaluate.harness_tasks: {', '.join(unknown)}: not a task of lm-evaluation-harness "
                              "(`lm-eval ls tasks` lists them); for your own data, name a task YAML file")


class HarnessScore(BaseModel):
    value: float
    # the value +- 1.96 of lm-eval's standard errors (its bootstrap for aggregates such as perplexity): a normal
    # interval, not clipped to the metric's range; None where lm-eval gives no error
    ci95: Interval | None
    higher_is_better: bool


def _templated(hflm: type) -> type:
    """lm-eval's HF model, with the rendered prompt kept whole where a chat template made it.

    lm-eval moves a context's trailing whitespace into the continuation, which suits plain text (" Paris" is one
    word-initial token). A chat template's generation prompt ends in whitespace that belongs to its marker
    ("<|im_start|>assistant\n"; the demo's "\n\n### Response:\n" is one token): split off, the prompt tokenizes
    unlike training, and a short answer can merge into the marker and leave nothing to score (lm-eval asserts). So the
    prompt is encoded as it stands, the answer as the rest of the whole text's tokens, as our own scoring does.
    """
    class Templated(hflm):
        def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
            whole, context_enc = self.tok_encode(context + continuation), self.tok_encode(context)
            if whole[:len(context_enc)] == context_enc and len(whole) > len(context_enc):
                return context_enc, whole[len(context_enc):]
            return context_enc, self.tok_encode(continuation, add_special_tokens=False)

    return Templated


def score(model: Any, tokenizer: Any, entries: list[str], root: Path, limit: int | None, batch_size: int,
          resamples: int, seed: int) -> dict[str, dict[str, HarnessScore]]:
    """task -> metric -> its score for `model` as loaded (a peft model with its adapter on or off included).

    Raises:
        DataError: lm-eval could not score a task (its data, or a metric that fails on these values).
    """
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    files = [root / e for e in entries if _is_file(e)]
    manager = TaskManager(include_path=sorted({str(f.parent.resolve()) for f in files}) or None)
    names = [_task_name(f) for f in files] + [e for e in entries if not _is_file(e)]
    chat = bool(tokenizer.chat_template)
    lm = (_templated(HFLM) if chat else HFLM)(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    try:
        out = simple_evaluate(model=lm, tasks=names, task_manager=manager, limit=limit, log_samples=False,
                              apply_chat_template=chat, bootstrap_iters=resamples, random_seed=seed,
                              numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)
    except Exception as exc:  # lm-eval raises whatever its datasets and metrics raise: one line, naming the tasks
        raise DataError(f"evaluate.harness_tasks: lm-evaluation-harness failed on {', '.join(names)}: "
                        f"{type(exc).__name__}: {exc}") from exc
    scores: dict[str, dict[str, HarnessScore]] = {}
    for task, metrics in out["results"].items():
        better = out.get("higher_is_better", {}).get(task, {})
        for key, value in metrics.items():
            # lm-eval's keys are "<metric>,<filter>", with "<metric>_stderr,<filter>" beside each
            if "," not in key or "_stderr," in key or not isinstance(value, (int, float)):
                continue
            metric, filt = key.split(",", 1)
            stderr = metrics.get(f"{metric}_stderr,{filt}")
            ci = None
            if isinstance(stderr, (int, float)) and math.isfinite(stderr):
                ci = Interval(low=value - Z95 * stderr, high=value + Z95 * stderr)
            scores.setdefault(task, {})[metric if filt == "none" else f"{metric} ({filt})"] = HarnessScore(
                value=float(value), ci95=ci, higher_is_better=bool(better.get(metric, True)))
    return scores
