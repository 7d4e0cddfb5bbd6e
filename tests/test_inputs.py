"""Every file a stage reads is a dependency of it: the inputs stage fingerprints each file params name
(llmops/pipeline/fingerprints.py), and an edit in place changes the fingerprint of the stage that reads it, and of no other."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import toy_model
from llmops.pipeline import fingerprints
from llmops.core.config import Params, StorageParams, readers


def _prints(root: Path, params: Params) -> dict[str, str]:
    fingerprints.write(root, params, StorageParams())
    return {stage: (root / fingerprints.OUT_DIR / f"{stage}.json").read_text() for stage in readers()}


def test_an_edit_in_place_changes_the_fingerprint_of_the_stage_that_reads_the_file(tmp_path):
    root = tmp_path
    for name in ("mine.jsonl", "mine_eval.jsonl", "corrections.jsonl"):
        (root / name).write_text(json.dumps({"prompt": "What is 2 + 2?", "response": "4"}) + "\n")
    (root / "corpus.txt").write_text("some text\n")
    (root / "template.jinja").write_text("{{ messages[0]['content'] }}")
    toy_model(root / "base")
    (root / "evals").mkdir()
    (root / "evals/task.yaml").write_text("task: mine\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                                          "    test: evals/rows.jsonl\ntest_split: test\n")
    (root / "evals/rows.jsonl").write_text('{"prompt": "a", "response": "b"}\n')
    (root / "pairs.csv").write_text("sent_more,sent_less,stereo_antistereo,bias_type\na,b,stereo,age\n")
    params = Params.model_validate({
        "data": {"instructions": "mine.jsonl", "eval_instructions": "mine_eval.jsonl", "corpus": "corpus.txt",
                 "corrections": "corrections.jsonl"},
        "train": {"finetune": {"base_model": "base", "chat_template": "template.jinja", "adapter": "base"}},
        "evaluate": {"harness_tasks": ["evals/task.yaml", "arc_easy"]},  # a registry name has no file
        "audit_bias": {"data": "pairs.csv"}})
    before = _prints(root, params)
    assert {stage: len(json.loads(text)) for stage, text in before.items()} == {
        "prepare_data": 4, "train": 2 * len(list((root / "base").iterdir())) + 1, "evaluate": 2, "audit_bias": 1}
    assert _prints(root, params) == before  # nothing edited, nothing changed: DVC skips every stage
    edits = {"mine.jsonl": "prepare_data", "mine_eval.jsonl": "prepare_data", "corpus.txt": "prepare_data",
             "corrections.jsonl": "prepare_data", "template.jinja": "train", "base/config.json": "train",
             "evals/task.yaml": "evaluate", "evals/rows.jsonl": "evaluate", "pairs.csv": "audit_bias"}
    for name, stage in edits.items():
        with open(root / name, "a") as fh:
            fh.write("\n")
        now = _prints(root, params)
        assert [s for s in readers() if now[s] != before[s]] == [stage], name
        before = now


@pytest.mark.services
def test_an_s3_input_is_fingerprinted_by_its_object(tmp_path, s3_endpoint, bucket):
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.put_object(Bucket=bucket, Key="pairs.csv", Body=b"one")
    params = Params.model_validate({"audit_bias": {"data": f"s3://{bucket}/pairs.csv"}})
    storage = StorageParams(remote="s3", bucket=bucket, endpoint_url=s3_endpoint)
    fingerprints.write(tmp_path, params, storage)
    first = (tmp_path / fingerprints.OUT_DIR / "audit_bias.json").read_text()
    s3.put_object(Bucket=bucket, Key="pairs.csv", Body=b"two")
    fingerprints.write(tmp_path, params, storage)
    assert (tmp_path / fingerprints.OUT_DIR / "audit_bias.json").read_text() != first
