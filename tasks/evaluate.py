"""evaluate: the fine-tuned model against its base on the held-out eval split.

Two measures, for both models on the same examples:

- perplexity: exp of the mean negative log-likelihood of the response tokens
  (and the end-of-text token) given the templated prompt, over all eval examples,
  token-weighted. Windowing: each example is its own window of at most the
  model's context (max_position_embeddings, less the virtual tokens of a
  prompt-tuning adapter); a longer example has the start of its prompt cut, so
  every response token is scored with as much of its prompt as fits. No text is
  shared between windows.
- exact match: the share of examples whose greedy answer (generation from the
  templated prompt until end-of-text or max_new_tokens, whitespace stripped)
  equals the reference response exactly.

Outputs: reports/evaluate/metrics.json (`dvc metrics show`, `dvc metrics diff`)
and reports/evaluate/samples.jsonl (every prompt with both models' answers).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from prefect import State, task
from prefect.artifacts import create_table_artifact
from prefect.states import Failed
from pydantic import BaseModel

from llmops.config import Params
from llmops.datasets import DataError, read_jsonl, write_jsonl, write_text
from llmops.modeling import (
    ModelError, encode_instruction, fit_to_length, instruction_tensors, load_adapter, load_causal_lm, load_tokenizer,
    resolve_base,
)
from llmops.repro import StageError, repro
from llmops.stage import run_cli

EVAL_DATA = Path("data/prepared/eval.jsonl")
ADAPTER = Path("models/finetune")
OUT_DIR = Path("reports/evaluate")


class Scores(BaseModel):
    perplexity: float
    exact_match: float
    examples: int


class EvalResult(BaseModel):
    base_model: str
    base: Scores
    finetuned: Scores
    by_task: dict[str, dict[str, float]]  # task -> exact match of base and finetuned


def _context(model: Any, virtual_tokens: int) -> int:
    return int(getattr(model.config, "max_position_embeddings", 2048)) - virtual_tokens


def perplexity(model: Any, tok: Any, rows: list[dict], max_len: int, batch_size: int) -> float:
    """exp(mean NLL) of the response tokens, token-weighted over all rows (one window per row)."""
    import torch

    data, _ = instruction_tensors(tok, rows, max_len, "truncate", str(EVAL_DATA))
    nll, count = 0.0, 0
    device = next(model.parameters()).device
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            batch = {k: v[i:i + batch_size].to(device) for k, v in data.items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            logits = logits[:, -batch["labels"].shape[1]:]  # a prompt-tuning model returns virtual positions first
            shifted, targets = logits[:, :-1], batch["labels"][:, 1:]
            loss = torch.nn.functional.cross_entropy(
                shifted.reshape(-1, shifted.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="sum"
            )
            nll += loss.item()
            count += int((targets != -100).sum())
    return math.exp(nll / count)


def greedy_answers(model: Any, tok: Any, rows: list[dict], max_len: int, max_new_tokens: int,
                   batch_size: int) -> list[str]:
    """Greedy generations from the templated prompts (left-padded batches), cut at end-of-text."""
    import torch

    device = next(model.parameters()).device
    answers = []
    for i in range(0, len(rows), batch_size):
        heads = []
        for row in rows[i:i + batch_size]:
            head, _ = encode_instruction(tok, row["prompt"], None)
            heads.append(fit_to_length(head, [], max_len - max_new_tokens)[0])
        width = max(map(len, heads))
        ids = torch.full((len(heads), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, head in enumerate(heads):
            ids[r, width - len(head):] = torch.tensor(head)
            mask[r, width - len(head):] = 1
        with torch.no_grad():
            out = model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
            )
        for seq in out[:, width:].tolist():
            if tok.eos_token_id in seq:
                seq = seq[: seq.index(tok.eos_token_id)]
            answers.append(tok.decode(seq, skip_special_tokens=True).strip())
    return answers


def _score(model: Any, tok: Any, rows: list[dict], params: Params, virtual_tokens: int) -> tuple[Scores, list[str]]:
    cfg = params.evaluate
    max_len = _context(model, virtual_tokens)
    ppl = perplexity(model, tok, rows, max_len, cfg.batch_size)
    answers = greedy_answers(model, tok, rows, max_len, cfg.max_new_tokens, cfg.batch_size)
    hits = sum(a == r["response"].strip() for a, r in zip(answers, rows))
    return Scores(perplexity=round(ppl, 4), exact_match=round(hits / len(rows), 4), examples=len(rows)), answers


def run_evaluate(params: Params, root: str | Path = ".") -> EvalResult:
    """Score the base model and the fine-tuned adapter on the eval split; write metrics.json and samples.jsonl.

    Raises:
        DataError: the eval split is missing or empty.
        ModelError: the base model or the fine-tuned adapter is missing.
    """
    import torch
    from peft import PeftConfig

    root = Path(root)
    if not (root / EVAL_DATA).is_file():
        raise DataError(f"{EVAL_DATA}: no such file; run `llmops run` (or `dvc pull` in a fresh clone)")
    rows = read_jsonl(root / EVAL_DATA)[: params.evaluate.max_examples]
    base_name = resolve_base(params.train.finetune.base_model, root)
    adapter = root / ADAPTER
    if not (adapter / "adapter_config.json").is_file():
        raise ModelError(f"{ADAPTER}/ has no trained adapter; run `llmops run` (or `dvc pull` in a fresh clone)")
    tok = load_tokenizer(str(adapter))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_causal_lm(base_name, dtype=torch.float32).to(device).eval()
    base, base_answers = _score(model, tok, rows, params, 0)

    virtual = getattr(PeftConfig.from_pretrained(str(adapter)), "num_virtual_tokens", 0) or 0
    model = load_adapter(model, adapter).to(device).eval()
    tuned, tuned_answers = _score(model, tok, rows, params, virtual)

    per_task: dict[str, list[tuple[bool, bool]]] = defaultdict(list)
    samples = []
    for row, a, b in zip(rows, base_answers, tuned_answers):
        ref = row["response"].strip()
        per_task[row.get("task") or "all"].append((a == ref, b == ref))
        samples.append({"prompt": row["prompt"], "reference": row["response"], "base": a, "finetuned": b})
    by_task = {
        name: {"base": round(sum(h[0] for h in hits) / len(hits), 4),
               "finetuned": round(sum(h[1] for h in hits) / len(hits), 4)}
        for name, hits in sorted(per_task.items())
    }
    result = EvalResult(base_model=params.train.finetune.base_model, base=base, finetuned=tuned, by_task=by_task)
    write_jsonl(root / OUT_DIR / "samples.jsonl", samples)
    write_text(root / OUT_DIR / "metrics.json", json.dumps(result.model_dump(), indent=2) + "\n")
    return result


def _cli_body(params: Params) -> str:
    r = run_evaluate(params)
    return (
        f"evaluate: {r.base.examples} eval examples\n"
        f"  base ({r.base_model}): perplexity {r.base.perplexity:.3f}, exact match {r.base.exact_match:.1%}\n"
        f"  fine-tuned:            perplexity {r.finetuned.perplexity:.3f}, exact match {r.finetuned.exact_match:.1%}\n"
        f"-> {OUT_DIR}/metrics.json"
    )


def main() -> int:
    return run_cli("evaluate", _cli_body)


@task(name="evaluate")
def evaluate(root: str) -> EvalResult | State:
    """Run the evaluate stage through DVC and publish base vs fine-tuned as a table."""
    try:
        run = repro(root, "evaluate")
    except StageError as exc:
        return Failed(message=str(exc))
    result = EvalResult.model_validate_json((Path(root) / OUT_DIR / "metrics.json").read_text())
    table = [
        {"metric": name, "base": getattr(result.base, name), "finetuned": getattr(result.finetuned, name),
         "change": round(getattr(result.finetuned, name) - getattr(result.base, name), 4)}
        for name in ("perplexity", "exact_match")
    ] + [
        {"metric": f"exact_match[{task_name}]", "base": s["base"], "finetuned": s["finetuned"],
         "change": round(s["finetuned"] - s["base"], 4)}
        for task_name, s in result.by_task.items()
    ]
    create_table_artifact(
        key="evaluate", table=table,
        description=(
            f"**evaluate** ({'cached, unchanged' if run.skipped else 'ran'}) on {result.base.examples} eval examples: "
            f"fine-tuned vs base `{result.base_model}`"
        ),
    )
    return result
