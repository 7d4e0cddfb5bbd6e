"""train: the base model (pretrained here from scratch, or fetched), then a peft adapter on it, with DeepSpeed ZeRO.

train@pretrain makes models/pretrain, the base that fine-tuning starts from: with
`train.finetune.base_model: pretrain` (the demo) it pretrains a small model from scratch on the
corpus; with a named base (a hub id or a local directory) it trains nothing and fetches that
model instead (llmops/training/base_model.py), so that DVC versions it like any other input.

This process prepares and checks everything before any training process starts
(tokenizer, tokenized data, base model and adapter, the memory fit), then
launches `deepspeed.num_procs` training processes (llmops/training/trainer.py; several through torchrun) and
finally publishes their weights atomically with the tokenizer and a manifest.

Outputs (train@<mode> in dvc.yaml):
    models/<mode>/                 pretrain: model.safetensors + config + tokenizer (a fetched base: its files)
                                   finetune: adapter_model.safetensors + adapter_config + tokenizer (+ merged/)
    models/<mode>/manifest.json    params, dataset hash, parent model, git commit, libraries, world size, results
    reports/train/<mode>/log.csv   loss, lr, tokens/s per optimizer step (`dvc plots show`)
    reports/train/<mode>/summary.json
Scratch, kept between runs for resume: checkpoints/train/<mode>/.
"""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
import statistics
import subprocess
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from llmops.core import locks, provenance
from llmops.core.config import ConfigError, FinetuneParams, Params, PretrainParams, TrainRunParams
from llmops.core.fs import replace_dir, write_text
from llmops.core.peft_methods import METHODS
from llmops.data.datasets import DataError, DataRefused, read_jsonl
from llmops.pipeline.repro import StageRun
from llmops.pipeline.stage import StageFailed, run_cli
from llmops.training import base_model, chat, checkpoints, licences, quantization
from llmops.training.fit import Shape, check_fit, describe, devices
from llmops.training.launch import check_qlora, command, rendezvous_endpoint, resolve_kernels
from llmops.training.modeling import (
    check_adapter,
    corpus_tensors,
    count_params,
    encode_row,
    example_tensors,
    fit_to_length,
    llama_config,
    load_config,
    load_tokenizer,
    meta_model,
    model_card,
    padding_share,
    resolve_base,
    train_tokenizer,
    verify_model_dir,
)
from llmops.training.trainer import FAILURE, LOG_COLUMNS, TrainJob, clear_stale_build_locks, sanitized_env

Mode = Literal["pretrain", "finetune"]
MODES: tuple[Mode, ...] = ("pretrain", "finetune")
PREPARED = Path("data/prepared")
MODELS = Path("models")
REPORTS = Path("reports/train")
RUNS = Path("checkpoints/train")
# train.finetune.max_seq_len: null takes the base's context up to this: LLaMA-Factory's default cutoff_len, which
# holds most instruction data; longer sequences cost memory (the fit check says whether a run can afford them)
DEFAULT_SEQ_LEN = 2048


class TrainResult(BaseModel):
    """What a train run produced (also stored in its manifest and summary.json)."""

    mode: Mode
    out_dir: str
    steps: int
    first_loss: float
    final_loss: float
    final_eval_loss: float | None = None  # on held-out data, at the last step
    tokens_per_s: float  # median over steps, all processes together
    resumed_from: int
    world_size: int
    params_total: int
    params_trainable: int
    truncated_examples: int = 0
    padding: float = 0.0  # share of the training sequences' token slots that were padding
    kernels: str = "none"  # as resolved for the machine it ran on
    continued_from: str | None = None  # train@pretrain continuing a named base's pretraining: that base


class FetchedBase(BaseModel):
    """What train@pretrain did instead of pretraining: the named base it fetched (also in summary.json)."""

    mode: Literal["pretrain"] = "pretrain"
    fetched: str  # the hub id or local directory
    revision: str | None  # the commit it resolved to (None: a local directory)
    licence: str | None  # its model card's
    out_dir: str
    params_total: int
    files: int
    size_bytes: int


class _Prepared(BaseModel):
    model: str  # what the training processes load: a config directory (pretrain) or the base model
    dataset: str
    parent: dict[str, Any] | None
    truncated: int
    fetched: dict[str, Any] | None = None  # continued pretraining: the named base it started from


def _sha256_json(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def _model_files_hash(path: Path) -> dict[str, str]:
    return {f.name: provenance.sha256_file(f) for f in sorted(path.iterdir()) if f.suffix in (".json", ".safetensors")}


def _prepare_pretrain(cfg: PretrainParams, root: Path, run_dir: Path) -> tuple[_Prepared, Any, Any, dict, dict | None]:
    corpus = root / PREPARED / "corpus.txt"
    if not corpus.is_file():
        raise DataError(f"{PREPARED}/corpus.txt: no such file; run prepare_data first (or `dvc pull`)")
    text = corpus.read_text(encoding="utf-8")
    tok = train_tokenizer((line for line in text.splitlines() if line.strip()), cfg.model.vocab_size, cfg.max_seq_len)
    config = llama_config(cfg.model, len(tok), cfg.max_seq_len, tok.eos_token_id, tok.pad_token_id)
    init = run_dir / "init"
    shutil.rmtree(init, ignore_errors=True)
    config.save_pretrained(init)
    tok.save_pretrained(init)
    tensors = corpus_tensors(tok, text, cfg.max_seq_len, f"{PREPARED}/corpus.txt")
    tensors, held_out = _hold_out_blocks(tensors)
    return _Prepared(model=str(init), dataset=str(corpus), parent=None, truncated=0), tok, config, tensors, held_out


def _hold_out_blocks(tensors: dict) -> tuple[dict, dict | None]:
    """The corpus blocks split into training and held-out ones: every 20th block, at most 64, for the eval loss."""
    n = tensors["input_ids"].shape[0]
    if n < 20:
        return tensors, None
    held = list(range(19, n, 20))[:64]
    kept = sorted(set(range(n)) - set(held))
    return {k: v[kept] for k, v in tensors.items()}, {k: v[held] for k, v in tensors.items()}


def _prepare_finetune(cfg: FinetuneParams, root: Path) -> tuple[_Prepared, Any, Any, dict, dict | None, FinetuneParams]:
    base = resolve_base(cfg.base_model, root, cfg.revision)
    verify_model_dir(base)
    config = load_config(base)
    if cfg.adapter:
        check_adapter(cfg.adapter, config, METHODS[cfg.method].peft_type)
    tok = chat.set_template(load_tokenizer(base), cfg.chat_template, f"base model {cfg.base_model}")
    data = root / PREPARED / "train.jsonl"
    rows = read_jsonl(data)
    source = f"{PREPARED}/train.jsonl"
    examples = [encode_row(tok, row, f"{source}: row {i}") for i, row in enumerate(rows, 1)]  # once, then counted
    lengths = [len(ids) for ids, _ in examples]
    cfg = _with_seq_len(cfg, config)
    virtual = cfg.prompt_tuning.num_virtual_tokens if cfg.method == "prompt_tuning" else 0
    limit = cfg.max_seq_len - virtual
    over = [i for i, n in enumerate(lengths, 1) if n > limit]
    if over and cfg.prompt_overflow == "refuse":
        raise DataRefused(f"{source}: {len(over)} of {len(rows)} examples are longer than max_seq_len ({limit} tokens"
                        + (f" after {virtual} virtual tokens" if virtual else "") + f"; the longest has "
                        f"{max(lengths)}), the first at row {over[0]} ({lengths[over[0] - 1]} tokens); raise "
                        "train.finetune.max_seq_len (the base's context allows "
                        f"{_context(config) or 'any'}), or set prompt_overflow: truncate or drop")
    print(f"train@finetune: {len(rows)} examples of {min(lengths)}-{max(lengths)} tokens (the base's tokenizer and "
          f"chat template); max_seq_len {cfg.max_seq_len}" + (f" less {virtual} virtual tokens" if virtual else "")
          + (f"; {len(over)} over it: prompt_overflow {cfg.prompt_overflow}" if over else ""), flush=True)
    # Prompt tuning puts its virtual tokens before each sequence: packed examples after the first would not see them.
    pack = cfg.packing and not METHODS[cfg.method].prompt_learning
    if cfg.packing and not pack:
        print(f"train@finetune: packing off: {cfg.method} prepends its virtual tokens to every sequence, so each "
              "example needs a sequence of its own")
    tensors, truncated = example_tensors(examples, limit, cfg.prompt_overflow, source, tok.pad_token_id, pack)
    if truncated:
        done = "had the start of their conversation cut" if cfg.prompt_overflow == "truncate" else "were left out"
        print(f"warning: train@finetune: {truncated} of {len(rows)} examples were longer than max_seq_len "
              f"({limit} tokens) and {done} (prompt_overflow: {cfg.prompt_overflow})")
    eval_file = root / PREPARED / "eval.jsonl"
    held_out = None
    if eval_file.is_file():  # the eval loss during training; evaluate scores the whole split afterwards
        # cut to fit where the answer fits, and left out where even it does not: a diagnostic, not the data trained on
        fitted = [fit_to_length(encode_row(tok, row, f"{eval_file}: row {i}"), limit)
                  for i, row in enumerate(read_jsonl(eval_file)[:256], 1)]
        if any(fitted):
            held_out, _ = example_tensors([e for e in fitted if e], limit, "refuse", str(eval_file), tok.pad_token_id)
    fetched = base_model.recorded(root)
    parent = {"base_model": cfg.base_model, "path": _portable(base, root),
              "sha256": _model_files_hash(Path(base)), "revision": (fetched or {}).get("revision")}
    if cfg.adapter:
        parent["adapter"] = {"path": _portable(cfg.adapter, root), "sha256": _model_files_hash(Path(cfg.adapter))}
    return (_Prepared(model=base, dataset=str(data), parent=parent, truncated=truncated), tok, config, tensors,
            held_out, cfg)


def _context(config: Any) -> int | None:
    """The positions a base model takes (GPT-2's n_positions answers to this name too)."""
    return getattr(config, "max_position_embeddings", None)


def _with_seq_len(cfg: FinetuneParams, config: Any) -> FinetuneParams:
    """cfg with max_seq_len resolved: as set, or (null) the base's context, at most DEFAULT_SEQ_LEN.

    Raises:
        ConfigError: max_seq_len is set beyond the base's context.
    """
    context = _context(config)
    if cfg.max_seq_len is not None:
        if context and cfg.max_seq_len > context:
            raise ConfigError(f"train.finetune.max_seq_len: {cfg.max_seq_len} is beyond the base's context "
                              f"({context} positions); set at most {context}, or null")
        return cfg
    return cfg.model_copy(update={"max_seq_len": min(context or DEFAULT_SEQ_LEN, DEFAULT_SEQ_LEN)})


def _portable(path: str, root: Path) -> str:
    """A path as a clone elsewhere can use it: relative to the project when inside it (a hub id stays as it is)."""
    p = Path(path)
    if not p.exists():
        return path
    try:
        return str(p.resolve().relative_to(root))
    except ValueError:
        return str(p.resolve())


def _counts(mode: Mode, cfg: TrainRunParams, config: Any):
    """The parameters of the model to train: for fine-tuning, with the adapter that the method puts on this
    architecture, built on an empty (meta) copy, so an architecture the method cannot adapt is refused here.

    Raises:
        ConfigError: the method finds nothing to adapt in this architecture (e.g. LoRA target names it lacks).
    """
    model = meta_model(config)
    if mode == "finetune":
        from peft import get_peft_model

        assert isinstance(cfg, FinetuneParams)
        try:
            model = get_peft_model(model, METHODS[cfg.method].peft_config(cfg.method_params))
        except (ValueError, TypeError, KeyError) as exc:  # peft's NoMatchingPeftModuleError is a ValueError
            key = f"train.finetune.{cfg.method}" + (".target_modules" if cfg.method == "lora" else "")
            linear = sorted({name.rsplit(".", 1)[-1] for name, m in meta_model(config).named_modules()
                             if type(m).__name__ in ("Linear", "Conv1D")})
            raise ConfigError(f"{key}: {cfg.method} cannot adapt a {config.model_type} model as set "
                             f"({str(exc).splitlines()[0][:200]}); its linear layers are {', '.join(linear)}: use "
                             "all-linear, null (peft's default for the architecture) or some of those") from None
    return count_params(model)


def run_train(mode: Mode, params: Params, root: str | Path = ".") -> TrainResult | FetchedBase | None:
    """Train (or resume training) and publish models/<mode>/ with its manifest and the step log.

    Returns:
        What the run produced (train@pretrain with a named base: what it fetched); None on a node of a multi-node
        run that did not run rank 0 (that node publishes).

    Raises:
        LaunchError: the params ask for kernels or QLoRA that this machine cannot run.
        ConfigError: several nodes (deepspeed.nnodes) and no rendezvous endpoint.
        DataError: missing or unusable data (e.g. an example longer than max_seq_len with prompt_overflow: refuse).
        ModelError: a missing base model, or an adapter that does not match it.
        FitError: the configuration cannot fit in the devices' memory.
        StageFailed: a training process failed; complete checkpoints are kept for the next run to resume.
    """
    root = Path(root).resolve()
    licences.before_training(params, root)
    if mode == "pretrain" and base_model.is_named(params.train.finetune.base_model) \
            and not params.train.pretrain.continue_pretraining:
        return _fetch_base(params, root)
    cfg: TrainRunParams = getattr(params.train, mode)
    kernels, endpoint = _launch_plan(mode, cfg)  # refused here, before anything is written or tokenized
    run_dir = root / RUNS / mode
    run_dir.mkdir(parents=True, exist_ok=True)
    try:  # two runs of one mode would write into the same checkpoints
        with locks.exclusive(run_dir.parent / f".{mode}.lock", f"train@{mode}"):
            return _train(mode, params, root, run_dir, kernels, endpoint)
    except locks.Busy as exc:
        raise StageFailed(str(exc)) from None


def _fetch_checked(params: Params, root: Path, dest: Path) -> tuple[dict[str, Any], Any, Any, Any]:
    """The named base fetched into `dest` (a new directory) and checked: tokenizer, chat template, licence, what the
    fine-tuning and quantization methods convert. Returns what was fetched, its config, its tokenizer (with the chat
    template params give) and the fine-tune's counts.

    Raises:
        BaseModelError: the base cannot be fetched, or lacks weights or a tokenizer.
        TemplateError, ConfigError: it cannot be fine-tuned as params say, or its licence is refused.
    """
    ft = params.train.finetune
    fetched = base_model.fetch(ft.base_model, ft.revision, dest, root)
    config = load_config(str(dest))
    tok = chat.set_template(load_tokenizer(str(dest)), ft.chat_template, f"base model {ft.base_model}")
    if not params.governance.base_model_licence:  # its card's, now that it is here
        licences.refuse_unregistrable(params, [{"input": f"train.finetune.base_model ({ft.base_model}, its model "
                                                         "card's)", "licence": fetched["licence"] or licences.UNKNOWN}])
    counts = _counts("finetune", ft, config)  # refuses now an architecture the method cannot adapt
    quantization.check_architecture(params.quantize.methods, meta_model(config))  # or would quantize nothing
    return fetched, config, tok, counts


def _fetch_base(params: Params, root: Path) -> FetchedBase:
    """models/pretrain as the named base: fetched, checked, and published whole with its manifest, or not at all.
    Nothing is trained."""
    ft = params.train.finetune
    tmp = root / MODELS / ".pretrain.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        fetched, _, _, counts = _fetch_checked(params, root, tmp)
        manifest = provenance.manifest(
            {"base_model": ft.base_model, "revision": ft.revision},
            {f.name: f for f in sorted(tmp.iterdir()) if f.suffix in (".json", ".safetensors")}, fetched=fetched)
        write_text(tmp / "manifest.json", json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # models/pretrain stays as it was
        raise
    result = FetchedBase(fetched=ft.base_model, revision=fetched["revision"], licence=fetched["licence"],
                         out_dir=str(MODELS / "pretrain"), params_total=counts.total - counts.trainable,
                         files=len(list(tmp.iterdir())), size_bytes=sum(f.stat().st_size for f in tmp.iterdir()))
    replace_dir(tmp, root / MODELS / "pretrain")
    reports = root / REPORTS / "pretrain"
    write_text(reports / "log.csv", ",".join(LOG_COLUMNS) + "\n")  # no steps: nothing was trained
    write_text(reports / "summary.json", json.dumps(result.model_dump(), indent=2) + "\n")
    write_text(reports / "manifest.json", json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return result


def _prepare_continued(params: Params, root: Path, run_dir: Path) -> tuple[_Prepared, Any, Any, dict, dict | None]:
    """Continued pretraining: the named base fetched (and checked) into the run's directory, and the corpus in
    blocks of its own tokenizer's tokens."""
    cfg, ft = params.train.pretrain, params.train.finetune
    corpus = root / PREPARED / "corpus.txt"
    if not corpus.is_file():
        raise DataError(f"{PREPARED}/corpus.txt: no such file; run prepare_data first (or `dvc pull`)")
    base = run_dir / "base"
    shutil.rmtree(base, ignore_errors=True)
    fetched, config, tok, _ = _fetch_checked(params, root, base)
    context = _context(config)
    if context and cfg.max_seq_len > context:
        raise ConfigError(f"train.pretrain.max_seq_len: {cfg.max_seq_len} is beyond the base's context ({context} "
                          f"positions); set at most {context}")
    tensors, held_out = _hold_out_blocks(corpus_tensors(tok, corpus.read_text(encoding="utf-8"), cfg.max_seq_len,
                                                        f"{PREPARED}/corpus.txt"))
    parent = {"base_model": ft.base_model, "revision": fetched["revision"], "sha256": fetched["sha256"]}
    return (_Prepared(model=str(base), dataset=str(corpus), parent=parent, truncated=0, fetched=fetched), tok, config,
            tensors, held_out)


def _launch_plan(mode: Mode, cfg: TrainRunParams) -> tuple[str, str | None]:
    """The kernels this machine runs and the rendezvous endpoint (None on one node), or why not."""
    import torch

    key = f"train.{mode}"
    cuda = torch.cuda.is_available()
    check_qlora(cfg, key, cuda)
    return resolve_kernels(cfg, key, cuda), rendezvous_endpoint(cfg, key)


def _train(mode: Mode, params: Params, root: Path, run_dir: Path, kernels: str,
           endpoint: str | None) -> TrainResult | None:
    cfg: TrainRunParams = getattr(params.train, mode)
    if mode == "finetune":
        prep, tok, config, tensors, held_out, cfg = _prepare_finetune(cfg, root)
    elif params.train.pretrain.continue_pretraining:
        prep, tok, config, tensors, held_out = _prepare_continued(params, root, run_dir)
    else:
        prep, tok, config, tensors, held_out = _prepare_pretrain(cfg, root, run_dir)

    counts = _counts(mode, cfg, config)
    shape = Shape(config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.vocab_size)
    estimate = check_fit(counts, shape, cfg, devices(cfg.deepspeed.num_procs), finetune=mode == "finetune",
                         kernels=kernels)

    from safetensors.torch import save_file

    data_file, eval_file = run_dir / "data.safetensors", run_dir / "eval.safetensors"
    save_file(tensors, str(data_file))
    if held_out is not None:
        save_file(held_out, str(eval_file))
    fingerprint = _sha256_json({
        # kernels and the rendezvous address change how a run computes or meets, not what it learns: a run resumes
        # across them
        "mode": mode, "cfg": cfg.model_dump(mode="json", exclude={"kernels": True, "deepspeed": {"rdzv_endpoint"}}),
        "data": provenance.sha256_file(data_file),
        # a fine-tuning base was hashed for the manifest already; hashing gigabytes twice buys nothing
        "model": (prep.parent or {}).get("sha256")
        or (_model_files_hash(Path(prep.model)) if Path(prep.model).is_dir() else prep.model),
    })
    ckpt_dir = run_dir / "checkpoints"
    for name in checkpoints.clean(ckpt_dir, fingerprint):
        print(f"train@{mode}: removed checkpoint {name} (incomplete, or of other params or data)")
    found = checkpoints.verified(ckpt_dir, fingerprint, warn=print)
    resumed_from = found[0] if found else 0

    tmp_out = root / MODELS / f".{mode}.tmp"
    shutil.rmtree(tmp_out, ignore_errors=True)
    tmp_out.mkdir(parents=True)
    log_file = run_dir / "log.csv"
    job = TrainJob(mode=mode, cfg=cfg.model_dump(mode="json"), data=str(data_file),
                   eval_data=str(eval_file) if held_out is not None else None, model=prep.model,
                   out_dir=str(tmp_out), ckpt_dir=str(ckpt_dir), resume_from=found[1].name if found else None,
                   log_file=str(log_file), fingerprint=fingerprint, kernels=kernels,
                   from_weights=prep.fetched is not None)
    job_file = run_dir / "job.json"
    job_file.write_text(job.model_dump_json(indent=2))
    world = cfg.deepspeed.num_procs * cfg.deepspeed.nnodes
    print(f"train@{mode}: {counts.total:,} parameters ({counts.trainable:,} trainable), "
          f"{tensors['input_ids'].shape[0]} sequences ({100 * padding_share(tensors):.1f}% padding), kernels "
          f"{kernels}; fits: {describe(estimate)}", flush=True)
    if endpoint:
        print(f"train@{mode}: one of {cfg.deepspeed.nnodes} nodes, meeting at {endpoint}", flush=True)
    env = sanitized_env()
    for op in clear_stale_build_locks(Path(env["TORCH_EXTENSIONS_DIR"])):
        print(f"train@{mode}: removed {op}/lock, left by a DeepSpeed op build that was killed", flush=True)
    cmd, ranks = command(cfg, f"train.{mode}", f"llmops-{mode}-{fingerprint[:16]}", str(job_file))
    proc = subprocess.run(cmd, cwd=root, env={**env, **ranks})
    failure = tmp_out / FAILURE  # an expected failure, e.g. divergence, explained by rank 0
    if proc.returncode != 0 or failure.exists():
        reason = json.loads(failure.read_text())["error"] if failure.exists() else (
            f"training processes exited with code {proc.returncode} (their output is above); complete "
            f"checkpoints in {RUNS / mode}/checkpoints are kept, and the next run resumes from the latest")
        shutil.rmtree(tmp_out, ignore_errors=True)
        raise StageFailed(reason)
    if not (tmp_out / "config.json").exists() and not (tmp_out / "adapter_config.json").exists():
        # rank 0 ran on another node, which publishes; this node's part is done (its checkpoints served their purpose)
        shutil.rmtree(tmp_out, ignore_errors=True)
        shutil.rmtree(run_dir)
        return None
    return _publish(mode, cfg, root, tmp_out, tok, prep, counts, log_file, resumed_from, world,
                    {"padding": padding_share(tensors), "kernels": kernels})


def _publish(mode: Mode, cfg: TrainRunParams, root: Path, tmp_out: Path, tok: Any, prep: _Prepared, counts,
             log_file: Path, resumed_from: int, world: int, how: dict[str, Any]) -> TrainResult:
    with open(log_file, newline="") as fh:
        rows = list(csv.DictReader(fh))
    tok.save_pretrained(tmp_out)
    if mode == "finetune":
        # peft records the absolute path of the base: name it as a clone elsewhere finds it
        adapter_cfg = tmp_out / "adapter_config.json"
        value = json.loads(adapter_cfg.read_text())
        value["base_model_name_or_path"] = prep.parent["path"] if prep.parent else value["base_model_name_or_path"]
        write_text(adapter_cfg, json.dumps(value, indent=2, sort_keys=True) + "\n")
        if isinstance(cfg, FinetuneParams) and cfg.merge:
            _merge(prep.model, tmp_out, tok)
    evals = [float(r["eval_loss"]) for r in rows if r.get("eval_loss")]
    result = TrainResult(
        mode=mode, out_dir=str(MODELS / mode), steps=int(rows[-1]["step"]), first_loss=float(rows[0]["loss"]),
        final_loss=float(rows[-1]["loss"]), final_eval_loss=evals[-1] if evals else None,
        tokens_per_s=statistics.median(float(r["tokens_per_s"]) for r in rows),
        resumed_from=resumed_from, world_size=world, params_total=counts.total, params_trainable=counts.trainable,
        truncated_examples=prep.truncated, continued_from=(prep.fetched or {}).get("base_model"), **how,
    )
    weights = {f.name: f for f in sorted(tmp_out.glob("*.safetensors"))}
    manifest = provenance.manifest(
        cfg.model_dump(mode="json"), {"dataset": Path(prep.dataset), **weights},
        mode=mode, dataset=str(Path(prep.dataset).relative_to(root)), parent_model=prep.parent,
        world_size=world, result=result.model_dump(), **({"fetched": prep.fetched} if prep.fetched else {}),
    )
    write_text(tmp_out / "manifest.json", json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    write_text(tmp_out / "README.md", model_card(mode, manifest))  # instead of peft's empty template
    replace_dir(tmp_out, root / MODELS / mode)

    reports = root / REPORTS / mode
    reports.mkdir(parents=True, exist_ok=True)
    write_text(reports / "log.csv", log_file.read_text())
    write_text(reports / "summary.json", json.dumps(result.model_dump(), indent=2) + "\n")
    write_text(reports / "manifest.json", (root / MODELS / mode / "manifest.json").read_text())
    return result


def _merge(base: str, adapter_dir: Path, tok: Any) -> None:
    """Write adapter_dir/merged: the base model with the LoRA update folded into its weights (servable alone)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, use_safetensors=True),
                                      str(adapter_dir))
    merged = adapter_dir / "merged"
    model.merge_and_unload().save_pretrained(merged, safe_serialization=True)
    tok.save_pretrained(merged)


def _cli_body(mode: Mode):
    def body(params: Params) -> str:
        r = run_train(mode, params)
        if r is None:
            return f"train@{mode}: this node's ranks are done; the node that ran rank 0 published {MODELS / mode}/"
        if isinstance(r, FetchedBase):
            return (f"train@pretrain: nothing to pretrain: fetched the base {r.fetched}"
                    + (f" at {r.revision}" if r.revision else "") + f" ({r.params_total:,} parameters, "
                    f"{r.size_bytes / 1e6:,.1f} MB, licence {r.licence or 'not stated'}) -> {r.out_dir}/")
        resumed = f", resumed from step {r.resumed_from}" if r.resumed_from else ""
        return (f"train@{mode}: {r.steps} steps{resumed}, loss {r.first_loss:.3f} -> {r.final_loss:.3f}, "
                f"{r.tokens_per_s:,.0f} tokens/s on {r.world_size} process(es) -> {r.out_dir}/")
    return body


def main(mode: Mode) -> int:
    code = run_cli(f"train@{mode}", _cli_body(mode))
    if code == 0:  # done and recorded in the audit trail: the resume checkpoints have served their purpose
        shutil.rmtree(RUNS / mode, ignore_errors=True)
    return code


def publish(root: Path, run: StageRun) -> TrainResult | FetchedBase:
    """The loss curve (every 5%) as a table, and the run's summary (a fetched base: what was fetched)."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact  # (only a flow publishes)
    mode = run.stage.split("@")[1]
    summary = json.loads((root / REPORTS / mode / "summary.json").read_text())
    if "fetched" in summary:
        fetched = FetchedBase.model_validate(summary)
        create_markdown_artifact(key="train-pretrain", markdown=(
            f"**train@pretrain** ({'cached, unchanged' if run.skipped else 'ran'}): no pretraining; fetched the base "
            f"`{fetched.fetched}`" + (f" at `{fetched.revision}`" if fetched.revision else "")
            + f", {fetched.params_total:,} parameters, licence {fetched.licence or 'not stated'} -> `{fetched.out_dir}/`"))
        return fetched
    result = TrainResult.model_validate(summary)
    with open(root / REPORTS / mode / "log.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    every = max(1, len(rows) // 20)
    create_table_artifact(
        key=f"train-{mode}",
        table=[{k: r[k] for k in ("step", "loss", "lr", "tokens_per_s")} for r in rows[::every]],
        description=(
            f"**train@{mode}** ({'cached, unchanged' if run.skipped else 'ran'}): {result.steps} steps, "
            f"loss {result.first_loss:.3f} -> {result.final_loss:.3f}, {result.tokens_per_s:,.0f} tokens/s, "
            f"{result.params_trainable:,} of {result.params_total:,} parameters trained, "
            f"{result.world_size} process(es) -> `{result.out_dir}/`"
        ),
    )
    return result
