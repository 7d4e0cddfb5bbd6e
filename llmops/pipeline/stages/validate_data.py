"""validate_data: the prepared dataset run through a Great Expectations suite.

Both instruction splits get the same suite (columns present and strings, no nulls
or blanks, length bounds, duplicate rate, no PII, in a conversation's earlier turns too);
whatever format the data came in (llmops/data/formats.py), its rows have the prompt (last user turn)
and response (final answer) these read. The train split also gets the
leakage check against the eval prompts. The pretraining corpus, one row per line,
is checked for rows and PII. A failure stops the pipeline with each failed
expectation, its counts and up to 3 example rows, PII masked.

The verdicts go to two files: result.json (the instruction splits, which fine-tuning
depends on) and corpus.json (the corpus, which pretraining depends on), so that new
instruction data, such as the monitor's corrections, does not pretrain the base again.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from llmops.core import provenance
from llmops.core.config import Params, ValidateDataParams
from llmops.core.fs import write_text
from llmops.data.datasets import DataError, read_jsonl
from llmops.governance import pii
from llmops.pipeline.repro import StageRun
from llmops.pipeline.stage import StageFailed, run_cli

IN_DIR = Path("data/prepared")
OUT_DIR = Path("reports/validate_data")
SPLITS = ("train", "eval")
CORPUS = "corpus"
FILES = {"train": "train.jsonl", "eval": "eval.jsonl", CORPUS: "corpus.txt"}
RESULTS = {"result.json": SPLITS, "corpus.json": (CORPUS,)}  # each verdict file, and the splits it holds
EXAMPLES = 3


class CheckResult(BaseModel):
    """One expectation on one split."""

    split: str
    check: str
    expectation: str
    column: str | None
    success: bool
    evaluated: bool = True  # False when it could not run because its column is missing
    unexpected_count: int = 0
    element_count: int = 0
    examples: list[dict[str, str]] = []


class ValidationResult(BaseModel):
    success: bool
    rows: dict[str, int]
    checks: list[CheckResult]

    @property
    def failed(self) -> list[CheckResult]:
        return [c for c in self.checks if c.evaluated and not c.success]

    @classmethod
    def of(cls, checks: list[CheckResult], rows: dict[str, int]) -> ValidationResult:
        """The verdict on `checks`: passed when every one that could run passed (a missing column fails its
        *_present check)."""
        return cls(success=all(c.success for c in checks if c.evaluated), rows=rows, checks=checks)

    def only(self, splits: tuple[str, ...]) -> ValidationResult:
        """The verdict on these splits alone."""
        return ValidationResult.of([c for c in self.checks if c.split in splits],
                                   {n: k for n, k in self.rows.items() if n in splits})


def _expectations(cfg: ValidateDataParams, split: str) -> list[Any]:
    """The suite for one split; each expectation carries a short check name in its meta."""
    import great_expectations.expectations as gxe

    from llmops.data.expectations import ExpectColumnValuesToContainNoCheckedPii

    def named(check: str, expectation):
        expectation.meta = {"check": check}
        return expectation

    def no_pii(col: str) -> list[Any]:
        out = []
        for kind in cfg.pii:
            if kind in pii.CHECKED:  # a regex alone would flag order numbers: Luhn or libphonenumber decides
                expectation = ExpectColumnValuesToContainNoCheckedPii(column=col, kind=kind,
                                                                      regions=list(cfg.phone_regions))
            else:
                expectation = gxe.ExpectColumnValuesToNotMatchRegex(column=col, regex=pii.PATTERNS[kind])
            out.append(named(f"{col}_no_{kind}", expectation))
        return out

    suite = [named("has_rows", gxe.ExpectTableRowCountToBeBetween(min_value=1))]
    if split == CORPUS:  # free text for pretraining: what the model would learn by heart must hold no PII
        return suite + no_pii("text")
    limits = {"prompt": cfg.max_prompt_chars, "response": cfg.max_response_chars}
    for col, max_chars in limits.items():
        suite += [
            named(f"{col}_present", gxe.ExpectColumnToExist(column=col)),
            named(f"{col}_not_null", gxe.ExpectColumnValuesToNotBeNull(column=col)),
            named(f"{col}_is_string", gxe.ExpectColumnValuesToBeOfType(column=col, type_="str")),
            named(f"{col}_not_blank", gxe.ExpectColumnValuesToMatchRegex(column=col, regex=r"\S")),
            named(
                f"{col}_length",
                gxe.ExpectColumnValueLengthsToBeBetween(column=col, min_value=cfg.min_chars, max_value=max_chars),
            ),
        ] + no_pii(col)
    suite += no_pii("context")  # a conversation's system message and earlier turns
    suite.append(
        named(
            "duplicate_rate",
            gxe.ExpectCompoundColumnsToBeUnique(column_list=["prompt", "response"], mostly=1 - cfg.max_duplicate_rate),
        )
    )
    if split == "train":
        suite.append(
            named(
                "no_eval_leakage",
                gxe.ExpectColumnValuesToNotBeInSet(column="prompt", value_set={"$PARAMETER": "eval_prompts"}),
            )
        )
    return suite


def _frame(rows: list[dict]):
    """The rows as a DataFrame; a conversation's earlier turns (system message included) are its `context` column,
    which the PII checks read too ("" for a single-turn row)."""
    import pandas as pd

    flat = [{k: v for k, v in row.items() if k != "messages"}
            | ({"context": "\n".join(str(m.get("content")) for m in row["messages"][:-2])}
               if isinstance(row.get("messages"), list) else {"context": ""}) if isinstance(row, dict) else row
            for row in rows]
    # object dtype keeps each value as read, so a number in a text column stays a number
    return pd.DataFrame.from_records(flat).astype(object)


def _examples(frame, indices: list[int]) -> list[dict[str, str]]:
    out = []
    for i in indices[:EXAMPLES]:
        row = frame.loc[i]
        out.append(
            {"line": str(int(i) + 1)}
            | {col: pii.mask(str(row[col]))[:120] for col in ("prompt", "response", "context", "text")
               if col in frame.columns and (col != "context" or row[col])}
        )
    return out


def validate(cfg: ValidateDataParams, splits: dict[str, list[dict]]) -> ValidationResult:
    """Run the suite through a Great Expectations validation definition on each split.

    Args:
        cfg: thresholds.
        splits: rows of "train" and "eval", and of "corpus" (one {"text": line} per line) where it is checked.

    Returns:
        One CheckResult per expectation and split.
    """
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    import pandas as pd
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    source = context.data_sources.add_pandas("prepared")
    frames = {name: _frame(rows) for name, rows in splits.items()}
    definitions = []
    for name in splits:
        batch = source.add_dataframe_asset(name).add_batch_definition_whole_dataframe(name)
        suite = context.suites.add(gx.ExpectationSuite(name=f"{name}_suite", expectations=_expectations(cfg, name)))
        definitions.append(
            context.validation_definitions.add(gx.ValidationDefinition(name=name, data=batch, suite=suite))
        )

    checks = []
    eval_prompts = sorted({p for p in frames["eval"].get("prompt", []) if isinstance(p, str)})
    for name, definition in zip(splits, definitions, strict=True):
        frame = frames[name]
        # pandas 3 gives text columns pyarrow storage when pyarrow is installed (Evidently brings it), and pyarrow's
        # RE2 refuses the PII patterns' lookbehinds and possessive quantifiers: Python's re, as everywhere else
        with pd.option_context("mode.string_storage", "python"):
            run = definition.run(
                batch_parameters={"dataframe": frame},
                expectation_parameters={"eval_prompts": eval_prompts},
                result_format={"result_format": "COMPLETE", "include_unexpected_rows": False},
            )
        for r in run.results:
            config = r.expectation_config
            columns = [config.kwargs["column"]] if "column" in config.kwargs else config.kwargs.get("column_list", [])
            # expectations on an absent column error out: column_present already reports it
            runnable = config.type == "expect_column_to_exist" or all(c in frame.columns for c in columns)
            result = r.result or {}
            checks.append(
                CheckResult(
                    split=name,
                    check=config.meta["check"],
                    expectation=config.type,
                    column=config.kwargs.get("column"),
                    success=bool(r.success),
                    evaluated=runnable,
                    unexpected_count=int(result.get("unexpected_count") or 0),
                    element_count=int(result.get("element_count") or result.get("observed_value") or len(frame)),
                    examples=_examples(frame, result.get("unexpected_index_list") or []),
                )
            )
    return ValidationResult.of(checks, {n: len(f) for n, f in frames.items()})


def failure_message(result: ValidationResult) -> str:
    """Each failed expectation with its counts and up to 3 example rows (PII masked)."""
    lines = [f"{len(result.failed)} expectation(s) failed:"]
    for c in result.failed:
        share = f" ({c.unexpected_count / c.element_count:.1%})" if c.element_count else ""
        lines.append(f"- {c.split}.{c.check} [{c.expectation}]: {c.unexpected_count} of {c.element_count} rows{share}")
        for ex in c.examples:
            fields = ", ".join(f"{k}={v!r}" for k, v in ex.items() if k != "line")
            lines.append(f"    {FILES.get(c.split, c.split)}:{ex['line']}: {fields}")
    skipped = [c for c in result.checks if not c.evaluated]
    if skipped:
        lines.append(f"({len(skipped)} more could not run because their column is missing)")
    return "\n".join(lines)


def _md_text(value: str) -> str:
    """A data value as literal text in a markdown table: no link, image or HTML in it renders (or loads)."""
    value = value.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return re.sub(r"([\\`*_\[\]()!|#~])", r"\\\1", value)


def report_markdown(result: ValidationResult) -> str:
    """The report a person reads: verdict, then a table of every expectation."""
    verdict = "PASSED" if result.success else "FAILED"
    rows = ", ".join(f"{n}: {k} rows" for n, k in result.rows.items())
    lines = [
        f"# Data validation {verdict}",
        "",
        f"Great Expectations suite on the prepared dataset ({rows}).",
        "",
        "| split | check | expectation | result | unexpected | examples (PII masked) |",
        "|---|---|---|---|---|---|",
    ]
    for c in result.checks:
        status = "pass" if c.success else ("not run (column missing)" if not c.evaluated else "**FAIL**")
        examples = "<br>".join(
            f"line {ex['line']}: " + "; ".join(f"{k}={_md_text(v)}" for k, v in ex.items() if k != "line")
            for ex in c.examples
        )
        lines.append(
            f"| {c.split} | {c.check} | `{c.expectation}` | {status} | {c.unexpected_count}/{c.element_count} | {examples} |"
        )
    return "\n".join(lines) + "\n"


def read_corpus(path: Path) -> list[dict[str, str]]:
    """The corpus as rows of one line each (blank ones too, so that a row's number is its line's)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not valid UTF-8 (byte {exc.start})") from None
    return [{"text": line} for line in text.splitlines()]


def run_validate_data(cfg: ValidateDataParams, in_dir: str | Path = IN_DIR, out_dir: str | Path = OUT_DIR) -> ValidationResult:
    """Validate `in_dir`/{train,eval}.jsonl and corpus.txt; write result.json, corpus.json and report.md into `out_dir`.

    Raises:
        DataError: a file is missing, empty or malformed.
        StageFailed: any expectation failed (the message lists them).
    """
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    # Input that cannot be read leaves the previous report in place; a verdict, pass or fail, replaces it.
    splits = {name: read_jsonl(in_dir / FILES[name], require=()) for name in SPLITS}
    splits[CORPUS] = read_corpus(in_dir / FILES[CORPUS])
    result = validate(cfg, splits)
    for name, held in RESULTS.items():
        part = result.only(held)
        summary = {
            "success": part.success,
            "rows": part.rows,
            "failed": len(part.failed),
            "checks": [c.model_dump() for c in part.checks],
        }
        write_text(out_dir / name, json.dumps(summary, indent=2) + "\n")
    write_text(out_dir / "report.md", report_markdown(result))
    provenance.write_report_manifest(out_dir, cfg, data=[in_dir / file for file in FILES.values()])
    if not result.success:
        raise StageFailed(failure_message(result))
    return result


def _cli_body(params: Params) -> str:
    result = run_validate_data(params.validate_data)
    return f"validate_data: all {len(result.checks)} expectations passed ({OUT_DIR}/report.md)"


def main() -> int:
    return run_cli("validate_data", _cli_body)


def publish(root: Path, run: StageRun) -> dict:
    """The report as a Prefect artifact, and the result for the flow."""
    publish_failed(root, run.stage)
    return {"skipped": run.skipped, **json.loads((root / OUT_DIR / "result.json").read_text())}


def publish_failed(root: Path, stage: str) -> None:
    """A failed validation still shows its report: which expectations failed, with examples."""
    from prefect.artifacts import create_markdown_artifact  # (only a flow publishes)
    report = root / OUT_DIR / "report.md"
    if report.exists():
        create_markdown_artifact(key="validate-data", markdown=report.read_text(), description="Data validation")
