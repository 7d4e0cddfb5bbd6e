"""quantize: the fine-tuned model (its LoRA merged into the base), weight-quantized by each method in params.

Every method is measured against the unquantized merged model, in this one process, on
the same eval rows as `evaluate`: on-disk size, perplexity, exact match, and greedy
generation latency (ms per token step at batch 1 and batch 8). The figures are what the
quantized model does after a save and a reload from safetensors, i.e. what would ship.
Where a method is slower or worse, the numbers say so; the gate decides.

Outputs: models/quantized/<method>/ (safetensors, config with its quantization_config,
tokenizer, manifest.json), reports/quantize/metrics.json and manifest.json.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from pydantic import BaseModel

from llmops.core import provenance
from llmops.core.config import ConfigError, Params
from llmops.core.fs import replace_dir, write_text
from llmops.data.datasets import DataError, read_jsonl
from llmops.evaluation import inference
from llmops.pipeline.repro import StageRun
from llmops.pipeline.stage import run_cli
from llmops.training import quantization
from llmops.training.modeling import load_causal_lm

EVAL_DATA = Path("data/prepared/eval.jsonl")
MODELS = Path("models/quantized")
OUT_DIR = Path("reports/quantize")
LATENCY_BATCHES = (1, 8)


class Measured(BaseModel):
    size_bytes: int
    perplexity: float
    exact_match: float
    ms_per_token: dict[str, float]  # batch_1, batch_8


class Quantized(Measured):
    library: str
    path: str
    quantized_layers: int = 0  # of linear_layers (the output layer left out), whose weights it converted
    linear_layers: int = 0
    size_ratio: float  # on disk, vs unquantized
    perplexity_change: float
    perplexity_change_ratio: float
    exact_match_change: float
    latency_ratio: dict[str, float]  # ms per token vs unquantized; < 1 is faster


class QuantizeResult(BaseModel):
    examples: int
    device: str
    reference: Measured  # the merged, unquantized model
    methods: dict[str, Quantized]


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def _measure(loaded: inference.Loaded, rows: list[dict], params: Params, size: int) -> Measured:
    cfg = params.quantize
    prompts = inference.contexts(rows)
    answers = inference.greedy_answers(loaded, prompts, params.evaluate.max_new_tokens, cfg.batch_size)
    latency = {
        f"batch_{b}": inference.ms_per_token(loaded, (prompts * b)[:b], cfg.latency_new_tokens, cfg.latency_repeats)
        for b in LATENCY_BATCHES
    }
    return Measured(
        size_bytes=size, perplexity=inference.perplexity(inference.response_logprobs(loaded, rows, cfg.batch_size)),
        exact_match=sum(inference.exact_matches(answers, rows)) / len(rows), ms_per_token=latency,
    )


def run_quantize(params: Params, root: str | Path = ".") -> QuantizeResult:
    """Merge, quantize with each method, save, reload and measure; publish models/quantized/ whole or not at all.

    Raises:
        ConfigError: a method this machine cannot run, or an adapter that cannot be merged.
        DataError: the eval split is missing.
        ModelError: the base model or adapter is missing or damaged.
    """
    cfg = params.quantize
    root = Path(root)
    dev = inference.device()
    quantization.check_runnable(cfg.methods)
    if not (root / EVAL_DATA).is_file():
        raise DataError(f"{EVAL_DATA}: no such file; run `llmops run` (or `dvc pull` in a fresh clone)")
    rows = read_jsonl(root / EVAL_DATA)[: cfg.max_examples]
    loaded = inference.load_finetuned(params, root)
    if loaded.virtual_tokens:
        raise ConfigError("quantize.methods: a prompt_tuning adapter cannot be merged into its base, so there is no "
                          "single model to quantize; use LoRA, or set quantize.methods: [] and gate.release_candidate: "
                          "none")

    parent = {"base": provenance.model_hashes(loaded.base_path, root),
              "adapter": provenance.model_hashes(inference.ADAPTER, root)}
    tmp = root / MODELS.with_name(f".{MODELS.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        reference, methods = _quantize_all(params, loaded, rows, tmp, parent, dev)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing half-written stays behind; models/quantized/ is untouched
        raise
    result = QuantizeResult(examples=len(rows), device=dev, reference=reference, methods=methods)
    replace_dir(tmp, root / MODELS)
    out = root / OUT_DIR
    write_text(out / "metrics.json", json.dumps(result.model_dump(), indent=2) + "\n")
    provenance.write_report_manifest(out, cfg, root, data=[EVAL_DATA], models=parent)
    return result


def _quantize_all(params: Params, loaded: inference.Loaded, rows: list[dict], tmp: Path, parent: dict,
                  dev: str) -> tuple[Measured, dict[str, Quantized]]:
    """The merged model measured, then each method: quantized, saved into tmp/<method>/, reloaded, measured."""
    cfg = params.quantize
    dtype = inference.compute_dtype(dev)  # GPU kernels (int4, fp8) compute in bf16
    merged_dir = tmp / ".merged"
    merged = loaded.model.merge_and_unload()
    merged.save_pretrained(merged_dir)
    tok = loaded.tokenizer
    reference = _measure(inference.Loaded(tok, merged, loaded.base_path, 0), rows, params, _size(merged_dir))
    del merged, loaded

    methods = {}
    for name in cfg.methods:
        out = tmp / name
        model = quantization.quantize(str(merged_dir), name, dev, dtype)
        done, layers = quantization.quantized(model)
        if not done:  # a method that changed nothing is refused, never reported as a quantized model
            quantization.check_architecture([name], model)
            raise ConfigError(f"quantize.methods: {name} quantized none of the {layers} linear layers of this model")
        model.save_pretrained(out)
        del model
        tok.save_pretrained(out)
        model = load_causal_lm(str(out), device_map=dev)  # what ships: reloaded from safetensors, as a user would
        m = _measure(inference.Loaded(tok, model, str(out), 0), rows, params, _size(out))
        del model
        methods[name] = Quantized(
            **m.model_dump(), library=quantization.METHODS[name].library, path=str(MODELS / name),
            quantized_layers=done, linear_layers=layers,
            size_ratio=m.size_bytes / reference.size_bytes,
            perplexity_change=m.perplexity - reference.perplexity,
            perplexity_change_ratio=m.perplexity / reference.perplexity - 1,
            exact_match_change=m.exact_match - reference.exact_match,
            latency_ratio={k: m.ms_per_token[k] / reference.ms_per_token[k] for k in m.ms_per_token},
        )
        weights = {f.name: f for f in out.glob("*.safetensors")}
        write_text(out / "manifest.json", json.dumps(provenance.manifest(
            {"method": name, **cfg.model_dump(mode="json")}, weights, parent=parent,
            result=methods[name].model_dump()), indent=2, sort_keys=True) + "\n")
    shutil.rmtree(merged_dir)
    return reference, methods


def _cli_body(params: Params) -> str:
    r = run_quantize(params)
    lines = [f"quantize: {r.examples} eval examples on {r.device}; unquantized: perplexity "
             f"{r.reference.perplexity:.3f}, exact match {r.reference.exact_match:.1%}, "
             f"{r.reference.ms_per_token['batch_1']:.2f} ms/token"]
    for name, q in r.methods.items():
        lines.append(f"  {name}: size x{q.size_ratio:.2f}, perplexity {q.perplexity:.3f} ({q.perplexity_change_ratio:+.1%}),"
                     f" exact match {q.exact_match:.1%} ({q.exact_match_change:+.1%}), latency x"
                     f"{q.latency_ratio['batch_1']:.2f} (batch 1) x{q.latency_ratio['batch_8']:.2f} (batch 8)")
    return "\n".join(lines + [f"-> {MODELS}/, {OUT_DIR}/metrics.json"])


def main() -> int:
    return run_cli("quantize", _cli_body)


def summary(r: QuantizeResult, previous: dict | None) -> str:
    return "\n".join(
        f"Quantized {name}: size x{q.size_ratio:.2f}, exact match {q.exact_match_change:+.1%}, "
        f"perplexity {q.perplexity_change_ratio:+.1%}, latency x{q.latency_ratio['batch_1']:.2f} (batch 1)"
        for name, q in r.methods.items())


def publish(root: Path, run: StageRun) -> QuantizeResult:
    """Each method against the unquantized model, as a table."""
    from prefect.artifacts import create_table_artifact  # (only a flow publishes)
    r = QuantizeResult.model_validate_json((root / OUT_DIR / "metrics.json").read_text())
    ref = r.reference
    table = [{"method": "none (unquantized)", "size MB": round(ref.size_bytes / 1e6, 3), "size ratio": 1.0,
              "perplexity": ref.perplexity, "perplexity change": 0.0, "exact match": ref.exact_match,
              "exact match change": 0.0, "ms/token b1": ref.ms_per_token["batch_1"],
              "ms/token b8": ref.ms_per_token["batch_8"]}]
    table += [{"method": f"{name} ({q.library})", "size MB": round(q.size_bytes / 1e6, 3),
               "size ratio": round(q.size_ratio, 4), "perplexity": q.perplexity,
               "perplexity change": q.perplexity_change, "exact match": q.exact_match,
               "exact match change": q.exact_match_change, "ms/token b1": q.ms_per_token["batch_1"],
               "ms/token b8": q.ms_per_token["batch_8"]} for name, q in r.methods.items()]
    create_table_artifact(key="quantize", table=table, description=(
        f"**quantize** ({'cached, unchanged' if run.skipped else 'ran'}) on {r.device}, {r.examples} eval examples; "
        "each method saved and reloaded from safetensors before it was measured"))
    return r
