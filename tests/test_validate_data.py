"""validate_data runs a real Great Expectations suite: each defect fails exactly its expectation."""

from __future__ import annotations

import json

import pytest

from llmops.data import sample_data
from llmops.core.config import ValidateDataParams
from llmops.data.datasets import DataError, write_jsonl
from llmops.core.fs import write_text
from llmops.pipeline.stage import StageFailed
from llmops.pipeline.stages.validate_data import run_validate_data


def _splits():
    rows = sample_data.instructions(seed=7, n=60)
    return rows[:50], rows[50:]


CORPUS = sample_data.corpus(seed=7, lines=40)


def _write(tmp_path, train, eval_, corpus=CORPUS):
    write_jsonl(tmp_path / "in" / "train.jsonl", train)
    write_jsonl(tmp_path / "in" / "eval.jsonl", eval_)
    write_text(tmp_path / "in" / "corpus.txt", corpus)
    return tmp_path / "in"


def _failed(tmp_path, train, eval_, cfg=None, corpus=CORPUS, verdict="result.json"):
    cfg = cfg or ValidateDataParams()
    with pytest.raises(StageFailed) as exc:
        run_validate_data(cfg, _write(tmp_path, train, eval_, corpus), tmp_path / "out")
    result = json.loads((tmp_path / "out" / verdict).read_text())
    failed = {f"{c['split']}.{c['check']}" for c in result["checks"] if c["evaluated"] and not c["success"]}
    return failed, str(exc.value), result


def test_clean_sample_passes_and_writes_reports(tmp_path):
    train, eval_ = _splits()
    result = run_validate_data(ValidateDataParams(), _write(tmp_path, train, eval_), tmp_path / "out")
    assert result.success and not result.failed
    summary = json.loads((tmp_path / "out" / "result.json").read_text())
    assert summary["success"] is True and summary["rows"] == {"train": 50, "eval": 10}
    names = {c["check"] for c in summary["checks"]}
    assert {"prompt_no_card", "duplicate_rate", "no_eval_leakage", "response_length"} <= names
    assert "# Data validation PASSED" in (tmp_path / "out" / "report.md").read_text()
    corpus = json.loads((tmp_path / "out" / "corpus.json").read_text())
    assert corpus["success"] is True and corpus["rows"] == {"corpus": len(CORPUS.splitlines())}
    assert {c["check"] for c in corpus["checks"]} == {"has_rows", "text_no_email", "text_no_phone", "text_no_card",
                                                      "text_no_ip", "text_no_iban", "text_no_ssn"}
    assert {c["split"] for c in summary["checks"]} == {"train", "eval"}


def test_the_corpus_verdict_depends_on_the_corpus_alone(tmp_path):
    """Pretraining depends on corpus.json (dvc.yaml): new instruction rows must leave it byte for byte as it was."""
    train, eval_ = _splits()
    run_validate_data(ValidateDataParams(), _write(tmp_path, train, eval_), tmp_path / "out")
    before = {name: (tmp_path / "out" / name).read_bytes() for name in ("result.json", "corpus.json")}
    run_validate_data(ValidateDataParams(), _write(tmp_path, train[:40], eval_), tmp_path / "out")
    assert (tmp_path / "out" / "corpus.json").read_bytes() == before["corpus.json"]
    assert (tmp_path / "out" / "result.json").read_bytes() != before["result.json"]


def test_pii_in_the_corpus_fails_its_check_and_names_the_line(tmp_path):
    train, eval_ = _splits()
    lines = CORPUS.splitlines()
    lines[4] = "Reach the author at jane.doe@example.com any day."
    failed, message, corpus = _failed(tmp_path, train, eval_, corpus="\n".join(lines) + "\n", verdict="corpus.json")
    assert failed == {"corpus.text_no_email"}
    assert "corpus.txt:5: text='Reach the author at [EMAIL] any day.'" in message and "jane.doe" not in message
    assert corpus["success"] is False
    assert json.loads((tmp_path / "out" / "result.json").read_text())["success"] is True  # the instructions passed


def _with(rows, index, **changes):
    rows = [dict(r) for r in rows]
    rows[index].update(changes)
    return rows


DEFECTS = {
    "missing_column": (lambda t: [{k: v for k, v in r.items() if k != "response"} for r in t], "train.response_present"),
    "null_prompt": (lambda t: _with(t, 3, prompt=None), "train.prompt_not_null"),
    "non_string_response": (lambda t: _with(t, 4, response=42), "train.response_is_string"),
    "blank_prompt": (lambda t: _with(t, 5, prompt="   "), "train.prompt_not_blank"),
    "too_long_response": (lambda t: _with(t, 6, response="x" * 3000), "train.response_length"),
    "duplicates": (lambda t: t + [dict(r) for r in t[:2]], "train.duplicate_rate"),
    "email": (lambda t: _with(t, 7, prompt="Write to jane.doe@example.com about 3 + 4."), "train.prompt_no_email"),
    "phone": (lambda t: _with(t, 8, response="Call +1 415-555-0100"), "train.response_no_phone"),
    "card": (lambda t: _with(t, 9, prompt="Charge 4111 1111 1111 1111 now."), "train.prompt_no_card"),
    "ip": (lambda t: _with(t, 10, response="Served from 10.20.30.40"), "train.response_no_ip"),
    "iban": (lambda t: _with(t, 11, prompt="Pay GB82 WEST 1234 5698 7654 32 the sum of 2 + 2."), "train.prompt_no_iban"),
    "ssn": (lambda t: _with(t, 12, response="My SSN is 123-45-6789"), "train.response_no_ssn"),
    "idn_email": (lambda t: _with(t, 13, prompt="Write to jürgen@bücher.de about 3 + 4."), "train.prompt_no_email"),
}


@pytest.mark.parametrize("defect", sorted(DEFECTS))
def test_each_defect_fails_exactly_its_expectation(tmp_path, defect):
    make, expected = DEFECTS[defect]
    train, eval_ = _splits()
    failed, message, _ = _failed(tmp_path, make(train), eval_)
    assert failed == {expected}
    assert expected.split(".")[1] in message


def test_leakage_between_splits(tmp_path):
    train, eval_ = _splits()
    failed, message, _ = _failed(tmp_path, train + [dict(eval_[0])], eval_)
    assert failed == {"train.no_eval_leakage"}
    assert eval_[0]["prompt"] in message


def test_failure_message_counts_and_masks_examples(tmp_path):
    train, eval_ = _splits()
    for i in range(5):
        train[i] = dict(train[i], prompt=f"Mail user{i}@example.org the answer to {i} + 1.")
    failed, message, result = _failed(tmp_path, train, eval_)
    assert failed == {"train.prompt_no_email"}
    assert "5 of 50 rows (10.0%)" in message
    assert message.count("[EMAIL]") == 3  # up to 3 examples, masked
    assert "@example.org" not in message
    assert "@example.org" not in (tmp_path / "out" / "report.md").read_text()
    check = next(c for c in result["checks"] if c["check"] == "prompt_no_email" and c["split"] == "train")
    assert check["unexpected_count"] == 5 and [e["line"] for e in check["examples"]] == ["1", "2", "3"]


def test_thresholds_come_from_params(tmp_path):
    train, eval_ = _splits()
    train = train + [dict(train[0])]  # 2 of 51 rows share a pair: 3.9%
    run_validate_data(ValidateDataParams(max_duplicate_rate=0.05), _write(tmp_path, train, eval_), tmp_path / "out")
    failed, _, _ = _failed(tmp_path, train, eval_, ValidateDataParams(max_duplicate_rate=0.03))
    assert failed == {"train.duplicate_rate"}
    failed, _, _ = _failed(tmp_path, _with(train[:50], 1, prompt="x" * 30), eval_, ValidateDataParams(max_prompt_chars=20))
    assert "train.prompt_length" in failed


def test_pii_kinds_can_be_switched_off(tmp_path):
    train, eval_ = _splits()
    train = _with(train, 0, response="ping 192.168.1.1")
    run_validate_data(ValidateDataParams(pii=["email", "phone", "card"]), _write(tmp_path, train, eval_), tmp_path / "out")


def test_missing_split_file_is_a_clear_error(tmp_path):
    write_jsonl(tmp_path / "in" / "train.jsonl", _splits()[0])
    with pytest.raises(DataError, match=r"eval\.jsonl: no such file"):
        run_validate_data(ValidateDataParams(), tmp_path / "in", tmp_path / "out")
    assert not (tmp_path / "out" / "result.json").exists()
    write_jsonl(tmp_path / "in" / "eval.jsonl", _splits()[1])
    with pytest.raises(DataError, match=r"corpus\.txt: no such file"):
        run_validate_data(ValidateDataParams(), tmp_path / "in", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_report_shows_data_as_text_never_as_markup_that_loads():
    from llmops.pipeline.stages.validate_data import CheckResult, ValidationResult, report_markdown

    row = {"line": "3", "prompt": "![x](http://evil.example/p.png)", "response": "<img src=http://evil.example/q>|"}
    check = CheckResult(split="train", check="duplicate_rate", expectation="expect_compound_columns_to_be_unique",
                        column=None, success=False, unexpected_count=1, element_count=3, examples=[row])
    line = report_markdown(ValidationResult(success=False, rows={"train": 3}, checks=[check])).splitlines()[-1]
    assert "<img" not in line and "](" not in line and "![" not in line
    assert "&lt;img src=http://evil.example/q&gt;\\|" in line and line.count(" | ") == 5  # six cells, pipe escaped
