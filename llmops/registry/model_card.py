"""Model cards: what a released model is for, what it was made from, and how it behaves, from its own records.

The release stage writes the card into the release itself, `models/release/README.md` (a Hugging
Face model card: YAML metadata through huggingface_hub's ModelCardData, then Markdown) and
`model_card.html`, so it travels with the model: pushed to the DVC remote, pulled with
`llmops registry pull`, versioned with it. It says: intended use and limitations (params
`governance`), the data, its licences and its validation, the training setup and losses,
evaluation and bias audit with 95% intervals, quantization, and the release gate's verdict. What
only the registry knows later (the version number, who registered it, its stages, approvals) is
added when the card is shown (`llmops registry show`).
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from llmops.core import dvcyaml

CARD = "README.md"
HTML = "model_card.html"


def _read(root: Path, path: str) -> dict[str, Any]:
    file = root / path
    return json.loads(file.read_text()) if file.is_file() else {}


def _pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def _ci(stats: dict, key: str, pct: bool = False) -> str:
    ci = stats.get(f"{key}_ci95")
    if not ci:
        return ""
    fmt = _pct if pct else (lambda v: f"{v:.3g}")
    return f" (95% CI {fmt(ci['low'])} to {fmt(ci['high'])})"


def _base_line(root: Path, pt, ft) -> str:
    """What the fine-tuning started from: the fetched base (hub id or directory, commit, licence), or the demo's
    pretraining."""
    fetched = _read(root, dvcyaml.stage(root, "train@pretrain").verdict)
    if "fetched" in fetched:
        return (f"- base model: {fetched['fetched']}" + (f" at commit {fetched['revision']}" if fetched["revision"] else "")
                + f", {fetched['params_total']:,} parameters, licence {fetched['licence'] or 'not stated'} (not "
                "trained here)")
    if fetched.get("continued_from"):
        return (f"- base model: {fetched['continued_from']}, its pretraining continued on data.corpus for "
                f"{pt.steps} steps at lr {pt.lr:g}, sequence {pt.max_seq_len}")
    return (f"- pretraining: {pt.model.num_layers} layers, hidden {pt.model.hidden_size}, {pt.model.num_heads} heads, "
            f"vocabulary {pt.model.vocab_size}; {pt.steps} steps at lr {pt.lr:g}, sequence {pt.max_seq_len}, "
            f"DeepSpeed ZeRO-{pt.deepspeed.zero_stage} ({pt.deepspeed.precision})")


def markdown(params, root: str | Path, release: dict[str, Any]) -> str:
    """The card of the release in `release` (release.json's content), built from the reports and params in `root`."""
    from huggingface_hub import ModelCard, ModelCardData

    root = Path(root)
    # each stage's verdict, where dvc.yaml declares it
    ev, bias, quant, valid = (_read(root, dvcyaml.stage(root, name).verdict)
                              for name in ("evaluate", "audit_bias", "quantize", "validate_data"))
    gov, ft, pt = params.governance, params.train.finetune, params.train.pretrain
    licences = sorted({e["licence"] for e in release["licences"]})
    data = ModelCardData(
        license=licences[0].lower() if len(licences) == 1 else "other", library_name="transformers",
        tags=["llmops", release["variant"]], base_model=None if ft.base_model == "pretrain" else ft.base_model,
        eval_results=None)
    tuned = ev.get("finetuned", {})
    lines = [
        f"# Model card: {release['variant']} release", "",
        "## Intended use", "", gov.intended_use, "",
        "## Limitations", "", gov.limitations, "",
        "## Data", "",
        "| input | licence |", "|---|---|",
        *(f"| {e['input']} | {e['licence']} |" for e in release["licences"]), "",
        (f"Validated by Great Expectations: {len(valid.get('checks', []))} expectations, "
         f"{'all passed' if valid.get('success') else 'FAILED'}; rows: "
         + ", ".join(f"{split} {n}" for split, n in valid.get("rows", {}).items()) + ".") if valid else
        "No validation report.", "",
        "## Training", "",
        _base_line(root, pt, ft),
        f"- fine-tuning: {ft.method} on {ft.base_model}; {ft.steps} steps at lr {ft.lr:g}, sequence "
        f"{ft.max_seq_len or 'up to the base context (2048 at most)'}"
        + (f", LoRA r={ft.lora.r}" if ft.method == "lora" else ""),
        *(f"- {mode} loss {s['first_loss']:.4f} -> {s['final_loss']:.4f}"
          + (f" (eval {s['final_eval_loss']:.4f})" if s.get("final_eval_loss") is not None else "")
          for mode in ("pretrain", "finetune")
          if "first_loss" in (s := _read(root, dvcyaml.stage(root, f"train@{mode}").verdict))),
        "",
        "## Evaluation", "",
    ]
    if tuned:
        lines += [
            f"On {tuned['examples']} held-out examples:", "",
            "| model | exact match | perplexity |", "|---|---|---|",
            *(f"| {name} | {_pct(s['exact_match'])}{_ci(s, 'exact_match', True)} | "
              + (f"{s['perplexity']:.3f}{_ci(s, 'perplexity')}" if "perplexity" in s else "-") + " |"
              for name, s in (("fine-tuned", tuned), ("base", ev["base"]), ("most frequent answer", ev["baseline"]))),
            "",
        ]
    lines += ["## Bias audit", ""]
    if bias.get("finetuned"):
        f, b = bias["finetuned"], bias["base"]
        lines += [f"{bias['pairs']} pairs ({bias.get('source', '')}); pct_stereotype, 50 is unbiased: "
                  f"fine-tuned {f['pct_stereotype']:.1f}{_ci(f, 'pct_stereotype')}, base "
                  f"{b['pct_stereotype']:.1f}{_ci(b, 'pct_stereotype')}.", ""]
    lines += ["## Quantization", ""]
    candidate = release["gate"].get("release_candidate", "none")
    if candidate != "none" and candidate in quant.get("methods", {}):
        q = quant["methods"][candidate]
        lines += [f"{candidate} ({q['library']}): size x{q['size_ratio']:.2f}, exact match change "
                  f"{100 * q['exact_match_change']:+.1f} points, perplexity {100 * q['perplexity_change_ratio']:+.1f}%, "
                  f"latency x{q['latency_ratio']['batch_1']:.2f} at batch 1 ({quant.get('device', '?')}).", ""]
    else:
        lines += ["Not quantized: the adapter merged into its base model.", ""]
    verdict = release["gate"]
    lines += ["## Release gate", "", f"{'Passed' if verdict['passed'] else 'Refused'}:", "",
              "| check | value | rule | passed |", "|---|---|---|---|",
              *(f"| {c['name']} | {c['value']:.4g} | {c['rule']} {c['threshold']:g} | {'yes' if c['passed'] else 'no'} |"
                for c in verdict.get("checks", [])), "",
              "## Lineage", "",
              *(f"- {name}: `{source.get('path', '?')}`, "
                + ", ".join(f"{file} sha256 `{digest[:16]}`" for file, digest in sorted(source.get("sha256", {}).items())
                            if file.endswith(".safetensors"))
                for name, source in sorted(release["sources"].items())), ""]
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)))


def to_html(card: str, title: str) -> str:
    """The card as a self-contained HTML page (no script, no remote resource)."""
    import markdown as md

    body = card.split("\n---\n", 1)[1] if card.startswith("---\n") else card  # the metadata stays in README.md
    return ("<!doctype html><html><head><meta charset='utf-8'><title>" + html.escape(title) + "</title><style>"
            "body{font-family:sans-serif;max-width:60em;margin:2em auto;padding:0 1em}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:.2em .6em;text-align:left}</style></head><body>"
            + md.markdown(body, extensions=["tables"]) + "</body></html>\n")


def write(out_dir: Path, params, root: str | Path, release: dict[str, Any]) -> None:
    """Write README.md and model_card.html into the release being built."""
    from llmops.core.fs import write_text

    card = markdown(params, root, release)
    write_text(out_dir / CARD, card)
    write_text(out_dir / HTML, to_html(card, f"Model card: {release['variant']}"))


def registry_section(version, events: list[dict[str, Any]]) -> str:
    """What the registry adds to a version's card: who registered it and why, its stages, the reviews."""
    lines = ["", "## Registry", "",
             f"Version {version.version}, registered {version.created_at[:19]} by "
             f"{version.record.get('by', version.author)}: {version.record.get('why', '')}. "
             f"Stages now: {', '.join(version.stages) or 'none'}.", "",
             "| when | event | stage | by | why |", "|---|---|---|---|---|",
             *(f"| {e['time'][:19]} | {e['event']} | {e.get('stage') or ''} | {e.get('by') or ''} | "
               f"{str(e.get('why', '')).replace('|', '/')} |" for e in events if e["version"] == version.version)]
    return "\n".join(lines) + "\n"
