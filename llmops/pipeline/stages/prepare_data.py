"""prepare_data: the instruction dataset (train and eval splits) and the pretraining corpus.

From the embedded sample generator (same seed, byte-identical files) or from the
user's own files (instructions as JSONL or CSV in any format of llmops/data/formats.py: chat
`messages`, alpaca, prompt/response; a plain-text corpus; local or s3://).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from pydantic import BaseModel

from llmops.core import provenance
from llmops.core.config import DataParams, Params, StorageParams, storage_from_env
from llmops.core.fs import replace_dir, write_text
from llmops.core.storage import read_bytes
from llmops.data import formats, sample_data
from llmops.data.datasets import DataError, parse_rows, write_jsonl
from llmops.pipeline.repro import StageRun
from llmops.pipeline.stage import run_cli

OUT_DIR = Path("data/prepared")


class PrepareResult(BaseModel):
    """What prepare_data wrote."""

    out_dir: str
    source: str
    train_rows: int
    eval_rows: int
    corpus_lines: int


def _read(uri: str, cfg: DataParams, storage: StorageParams) -> list[dict]:
    """A file of instruction rows in its format, as prepared rows (prompt, response, and a conversation's messages)."""
    return formats.normalize(parse_rows(read_bytes(uri, storage), uri, require=()), uri, cfg.format)


def _split_rows(cfg: DataParams, storage: StorageParams) -> tuple[list[dict], list[dict], str]:
    if cfg.instructions is None:
        rows = sample_data.instructions(cfg.seed, cfg.num_examples)
        train, eval_ = sample_data.split(rows, cfg.eval_fraction, cfg.seed)
        return train, eval_, f"generated sample (seed {cfg.seed})"
    rows = _read(cfg.instructions, cfg, storage)
    if cfg.eval_instructions:
        eval_ = _read(cfg.eval_instructions, cfg, storage)
        return rows, eval_, f"{cfg.instructions} + {cfg.eval_instructions}"
    if len(rows) < 2:
        raise DataError(f"{cfg.instructions}: {len(rows)} row, need at least 2 to split into train and eval")
    train, eval_ = sample_data.split(rows, cfg.eval_fraction, cfg.seed)
    return train, eval_, cfg.instructions


def _corpus(cfg: DataParams, storage: StorageParams) -> str:
    if cfg.corpus is None:
        return sample_data.corpus(cfg.seed, cfg.corpus_lines)
    raw = read_bytes(cfg.corpus, storage)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(f"{cfg.corpus}: line {line}: not valid UTF-8") from None
    if not text.strip():
        raise DataError(f"{cfg.corpus}: empty corpus (no text)")
    return text


def run_prepare_data(cfg: DataParams, storage: StorageParams, out_dir: str | Path = OUT_DIR) -> PrepareResult:
    """Write train.jsonl, eval.jsonl, corpus.txt and manifest.json into `out_dir`.

    The files are built in a sibling temporary directory and swapped in whole, so
    a failure (bad input, crash) leaves the previous output untouched.

    Raises:
        DataError: a user file is missing, empty or malformed (the message names file and line).
        StorageError: an s3:// input cannot be read.
    """
    out_dir = Path(out_dir)
    train, eval_, source = _split_rows(cfg, storage)
    if cfg.corrections:  # reviewed answers from production: training rows only, judged by validate_data like the rest
        corrections = formats.normalize(parse_rows(read_bytes(cfg.corrections, storage), cfg.corrections, require=()),
                                        cfg.corrections)
        held_out = {row.get("prompt") for row in eval_}
        kept = [row for row in corrections if row.get("prompt") not in held_out]
        train = train + kept
        source += f" + {len(kept)} corrections from {cfg.corrections}"
        if len(kept) < len(corrections):  # a user asked an eval prompt: its correction would leak the eval split
            source += f" ({len(corrections) - len(kept)} left out: their prompts are in the eval split)"
    text = _corpus(cfg, storage)

    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    write_jsonl(tmp / "train.jsonl", train)
    write_jsonl(tmp / "eval.jsonl", eval_)
    write_text(tmp / "corpus.txt", text)
    result = PrepareResult(
        out_dir=str(out_dir), source=source, train_rows=len(train), eval_rows=len(eval_),
        corpus_lines=text.count("\n") + (not text.endswith("\n")),
    )
    files = {name: tmp / name for name in ("train.jsonl", "eval.jsonl", "corpus.txt")}
    manifest = provenance.manifest(cfg.model_dump(), files, result=result.model_dump())
    write_text(tmp / "manifest.json", json.dumps(manifest, indent=2, sort_keys=True) + "\n")

    replace_dir(tmp, out_dir)
    return result


def _cli_body(params: Params) -> str:
    r = run_prepare_data(params.data, storage_from_env(params.storage))
    return (
        f"prepare_data: {r.train_rows} train / {r.eval_rows} eval examples and "
        f"{r.corpus_lines} corpus lines from {r.source} -> {r.out_dir}/"
    )


def main() -> int:
    return run_cli("prepare_data", _cli_body)


def publish(root: Path, run: StageRun) -> PrepareResult:
    """The flow's summary of the stage: a table of the files it wrote, with their hashes."""
    from prefect.artifacts import create_table_artifact  # (only a flow publishes)
    manifest = json.loads((root / OUT_DIR / "manifest.json").read_text())
    result = PrepareResult.model_validate(manifest["result"])
    create_table_artifact(
        key="prepare-data",
        table=[
            {"file": f"{OUT_DIR}/{name}", "sha256": digest[:12]} for name, digest in manifest["sha256"].items()
        ],
        description=(
            f"**prepare_data** ({'cached, unchanged' if run.skipped else 'ran'}): {result.train_rows} train / "
            f"{result.eval_rows} eval examples, {result.corpus_lines} corpus lines, from {result.source}"
        ),
    )
    return result
