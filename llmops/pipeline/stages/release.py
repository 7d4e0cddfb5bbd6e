"""release: package what the gate passed into models/release/, the one directory the registry versions and the server loads.

The release candidate (gate.release_candidate) is the quantized model of that method, or,
for `none`, the fine-tuned model with its LoRA adapter merged into the base. Either way the
directory is self-contained: config, safetensors weights, and a tokenizer whose chat template
is the instruction template the model was trained on (so a chat request is the prompt it knows).
A LoRA fine-tune's release also holds the adapter itself, in adapter/, for multi-adapter serving.
Beside them, release.json says what it is and where it came from: the variant, the hashes of
its sources, and the gate's verdict with the scores behind it; the registry records it as the
version's lineage.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from pydantic import BaseModel

from llmops.core import provenance
from llmops.core.config import ConfigError, Params
from llmops.core.fs import replace_dir, write_text
from llmops.data.datasets import DataError
from llmops.evaluation import inference
from llmops.pipeline.repro import StageRun
from llmops.pipeline.stage import StageFailed, run_cli
from llmops.pipeline.stages import gate
from llmops.registry import model_card
from llmops.training import licences
from llmops.training.modeling import load_tokenizer

OUT = Path("models/release")
ADAPTER_DIR = "adapter"  # models/release/adapter/: the LoRA adapter, for serving many versions on one base


class Release(BaseModel):
    variant: str  # "quantized/<method>" or "merged"
    sources: dict[str, dict]  # base, adapter (and quantized): model_hashes of what it was made from
    gate: dict  # the verdict: passed, release_candidate, checks
    scores: dict[str, dict]  # headline figures of evaluate, audit_bias and quantize
    licences: list[dict[str, str]]  # each input (data, base model) and its licence: see llmops/training/licences.py
    adapter: str | None = None  # the LoRA adapter's directory in the release (multi-adapter serving), if any


def _scores(reports: dict[str, dict], candidate: str) -> dict[str, dict]:
    ev, audit, quant = reports["evaluate"], reports["audit_bias"], reports["quantize"]
    scores = {
        "evaluate": {"exact_match": ev["finetuned"]["exact_match"], "perplexity": ev["finetuned"]["perplexity"],
                     "base_exact_match": ev["base"]["exact_match"], "baseline_exact_match": ev["baseline"]["exact_match"],
                     "examples": ev["finetuned"]["examples"]},
        "audit_bias": {"pct_stereotype": audit["finetuned"]["pct_stereotype"],
                       "base_pct_stereotype": audit["base"]["pct_stereotype"]},
    }
    if candidate != "none":
        q = quant["methods"][candidate]
        scores["quantize"] = {k: q[k] for k in ("size_ratio", "exact_match", "exact_match_change", "perplexity",
                                                "perplexity_change_ratio", "latency_ratio")}
    return scores


def run_release(params: Params, root: str | Path = ".") -> Release:
    """Build models/release/ from the release candidate the gate passed; replace it whole, or leave it as it was.

    Raises:
        DataError: the gate or a report it weighed has not run.
        StageFailed: the gate's verdict is a refusal (nothing is released).
        ConfigError: a prompt-tuning adapter, which cannot be merged into a single model.
        ModelError: a source model is missing or damaged.
    """
    root = Path(root)
    judged = gate.verdict_path(root)
    reports = gate.read_reports(root, {"gate": judged, **gate.inputs(root)})  # the verdict and what it weighed
    verdict = reports.pop("gate")
    if not verdict["passed"]:
        raise StageFailed(f"the release gate refused this model ({judged}); nothing to release")
    candidate = verdict["release_candidate"]
    if candidate != params.gate.release_candidate:
        raise DataError(f"{judged} is for release candidate {candidate!r} but gate.release_candidate is "
                        f"{params.gate.release_candidate!r}; run the gate again (`llmops run`)")

    tmp = root / OUT.with_name(f".{OUT.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        sources = _build(params, root, candidate, tmp)
        release = Release(variant="merged" if candidate == "none" else f"quantized/{candidate}", sources=sources,
                          gate=verdict, scores=_scores(reports, candidate), licences=licences.of_inputs(params, root),
                          adapter=ADAPTER_DIR if (tmp / ADAPTER_DIR).is_dir() else None)
        write_text(tmp / "release.json", json.dumps(release.model_dump(), indent=2) + "\n")
        model_card.write(tmp, params, root, release.model_dump())
        weights = {f.name: f for f in tmp.glob("*.safetensors")}
        write_text(tmp / "manifest.json", json.dumps(provenance.manifest(
            {"release_candidate": candidate, "base_model": params.train.finetune.base_model}, weights,
            parent=sources), indent=2, sort_keys=True) + "\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # models/release/ stays as it was
        raise
    replace_dir(tmp, root / OUT)
    return release


def _build(params: Params, root: Path, candidate: str, tmp: Path) -> dict[str, dict]:
    """Write the candidate's model and tokenizer (with the chat template it was trained with) into tmp; return the
    hashes of its sources."""
    if candidate != "none":
        src = Path("models/quantized") / candidate
        if not (root / src / "config.json").is_file():
            raise DataError(f"{src}/: no such model; run the quantize stage first (`llmops run`)")
        shutil.copytree(root / src, tmp, ignore=shutil.ignore_patterns("manifest.json"))
        manifest = json.loads((root / src / "manifest.json").read_text())
        tok = load_tokenizer(str(root / src))
        sources = {**manifest.get("parent", {}), "quantized": provenance.model_hashes(src, root)}
    else:
        loaded = inference.load_finetuned(params, root, dtype="auto")  # merged in the base's own precision
        if loaded.virtual_tokens:
            raise ConfigError("gate.release_candidate: none needs a LoRA adapter to merge into its base; a "
                              "prompt_tuning adapter cannot be merged, so there is no single model to release")
        loaded.model.merge_and_unload().save_pretrained(tmp)
        tok = loaded.tokenizer
        sources = {"base": provenance.model_hashes(loaded.base_path, root),
                   "adapter": provenance.model_hashes(inference.ADAPTER, root)}
    tok.save_pretrained(tmp)  # with the chat template training rendered through: served chats render the same
    _adapter(root, tok, tmp / ADAPTER_DIR)
    return sources


def _adapter(root: Path, tok, out: Path) -> None:
    """The LoRA adapter itself, beside the model made from it: a server holding the base once serves every
    version's adapter on it (llmops/serving/multilora.py). Its files are the fine-tune's, so DVC stores them once."""
    from peft import PeftConfig

    if PeftConfig.from_pretrained(str(root / inference.ADAPTER)).peft_type != "LORA":
        return  # a prompt-tuning version is served on its own (its release is its quantized model)
    out.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors", "manifest.json"):
        shutil.copy2(root / inference.ADAPTER / name, out / name)
    tok.save_pretrained(out)  # with the chat template: the adapter answers chat requests as the release does


def _cli_body(params: Params) -> str:
    r = run_release(params)
    return f"release: {r.variant} -> {OUT}/ (gate passed {len(r.gate['checks'])} checks)"


def main() -> int:
    return run_cli("release", _cli_body)


def summary(release: Release, previous: dict | None) -> str:
    return f"Released: {release.variant} in {OUT}/"


def publish(root: Path, run: StageRun) -> Release | None:
    from prefect.artifacts import create_markdown_artifact  # (only a flow publishes)
    path = root / OUT / "release.json"
    if not path.is_file():
        return None
    release = Release.model_validate_json(path.read_text())
    ev = release.scores["evaluate"]
    create_markdown_artifact(key="release", markdown=(
        f"**release** ({'cached, unchanged' if run.skipped else 'ran'}): `{release.variant}` in `{OUT}/`, "
        f"exact match {ev['exact_match']:.1%}, perplexity {ev['perplexity']:.3f}; "
        f"the gate passed all {len(release.gate['checks'])} checks"))
    return release
