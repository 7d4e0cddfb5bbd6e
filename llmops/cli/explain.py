"""`llmops explain`: which prompt tokens an answer came from (feature ablation), as a table, a heatmap and JSON."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from llmops.cli import output
from llmops.core.errors import LlmopsError
from llmops.core.layout import EXPLAIN as OUT_DIR


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "explain", help="token-level attributions of an answer to the prompt's tokens (feature ablation, captum)",
        description="Explain a model's answer: each prompt token in turn is replaced by a neutral token and the "
        "answer tokens' lost log-probability is its attribution (captum's LLM attribution). Prints a table; writes "
        "explanation.json and attributions.png (a heatmap). The server answers the same at POST /v1/explain.")
    parser.add_argument("prompt", help="the prompt (rendered through the model's chat template, as the server does)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--version", default="production", help="a registered version or stage (default: production)")
    which.add_argument("--model", help="a model directory instead")
    parser.add_argument("--answer", help="the answer to explain (default: the model's greedy answer)")
    parser.add_argument("--max-tokens", type=int, default=16, help="the greedy answer's length bound")
    parser.add_argument("--out", help=f"where to write explanation.json and attributions.png (default {OUT_DIR}/<time>)")
    output.add_json(parser, "explanation.json's document, not the table")


def main(args: argparse.Namespace) -> int:
    from llmops.evaluation import explain
    from llmops.registry import versions as registry
    from llmops.serving import instances as servers

    root = Path.cwd()
    try:
        if args.model:
            model_dir = Path(args.model)
        else:
            model_dir = servers.model_dir(root, registry.resolve(root, args.version).version)
        model, tokenizer = explain.load(model_dir)
        result = explain.explain(model, tokenizer, args.prompt, answer=args.answer, max_new_tokens=args.max_tokens)
    except (LlmopsError, OSError) as exc:
        print(f"error: explain: {exc}", file=sys.stderr)
        return 1
    out = Path(args.out) if args.out else OUT_DIR / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    (out / "explanation.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    result.plot(out / "attributions.png")
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
        return 0
    print(result.table())
    print(f"\n{out}/explanation.json, {out}/attributions.png")
    return 0
