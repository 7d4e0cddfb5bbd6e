"""prepare_data: deterministic embedded sample, the user's own files (local or s3://), clear errors."""

from __future__ import annotations

import json
import random

import pytest

from llmops.data import sample_data
from llmops.core.config import DataParams, StorageParams
from llmops.data.datasets import DataError, read_jsonl
from llmops.core.storage import StorageError
from llmops.pipeline.stages.prepare_data import run_prepare_data

FILES = ("train.jsonl", "eval.jsonl", "corpus.txt")
SMALL = dict(num_examples=300, corpus_lines=200)


def _read(out):
    return {name: (out / name).read_bytes() for name in FILES}


def test_same_seed_gives_byte_identical_files(tmp_path):
    a = run_prepare_data(DataParams(seed=3, **SMALL), StorageParams(), tmp_path / "a")
    b = run_prepare_data(DataParams(seed=3, **SMALL), StorageParams(), tmp_path / "b")
    assert _read(tmp_path / "a") == _read(tmp_path / "b")
    run_prepare_data(DataParams(seed=4, **SMALL), StorageParams(), tmp_path / "c")
    assert all(_read(tmp_path / "a")[n] != _read(tmp_path / "c")[n] for n in FILES)
    assert (a.train_rows, a.eval_rows, a.corpus_lines) == (270, 30, 200) == (b.train_rows, b.eval_rows, b.corpus_lines)


def test_sample_answers_are_exact_and_splits_disjoint(tmp_path):
    run_prepare_data(DataParams(**SMALL), StorageParams(), tmp_path)
    splits = {n: [json.loads(line) for line in (tmp_path / f"{n}.jsonl").read_text().splitlines()] for n in ("train", "eval")}
    rows = splits["train"] + splits["eval"]
    assert all(sample_data.solve(r["prompt"]) == r["response"] for r in rows)
    assert {r["task"] for r in rows} == set(sample_data.TASKS)
    assert not {r["prompt"] for r in splits["train"]} & {r["prompt"] for r in splits["eval"]}
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["params"]["num_examples"] == 300 and set(manifest["sha256"]) == set(FILES)
    assert manifest["libraries"]["great_expectations"]


def test_solve_checks_answers_exactly():
    assert sample_data.solve("What number comes after 399?") == "400"
    assert sample_data.solve("Convert 3 kilometers to meters.") == "3000 meters"
    assert sample_data.solve("What is the last letter of 'tamuzo'?") == "o"
    assert sample_data.solve("Tell me a joke.") is None


def test_corpus_states_no_instruction_rows_answer():
    rows = sample_data.instructions(0, 2000)
    text = sample_data.corpus(0, 4000)
    assert not [r for r in rows if r["prompt"] in text]  # no row's question, in Q/A form
    facts = set(text.splitlines())
    for name, generate in sample_data.TASKS.items():  # nor its fact as a sentence
        rng = random.Random(name)
        for _ in range(200):
            prompt, _, statement = generate(rng)
            assert (statement in facts) <= sample_data.in_corpus_share(prompt)


def test_own_jsonl_and_csv_with_separate_eval(tmp_path):
    (tmp_path / "train.jsonl").write_text(
        '{"prompt": "Say hi", "response": "hi", "source": "crm"}\n\n{"prompt": "Say bye", "response": "bye"}\n'
    )
    (tmp_path / "eval.csv").write_text('prompt,response\n"Say ""yo""","yo"\nSay ok,ok\n')
    (tmp_path / "corpus.txt").write_text("Some text.\nMore text.\n")
    cfg = DataParams(
        instructions=str(tmp_path / "train.jsonl"), eval_instructions=str(tmp_path / "eval.csv"),
        corpus=str(tmp_path / "corpus.txt"),
    )
    result = run_prepare_data(cfg, StorageParams(), tmp_path / "out")
    assert (result.train_rows, result.eval_rows, result.corpus_lines) == (2, 2, 2)
    eval_rows = [json.loads(line) for line in (tmp_path / "out" / "eval.jsonl").read_text().splitlines()]
    assert eval_rows[0] == {"prompt": 'Say "yo"', "response": "yo"}
    assert (tmp_path / "out" / "corpus.txt").read_text() == "Some text.\nMore text.\n"


def test_a_line_break_inside_a_json_string_is_not_a_new_row(tmp_path):
    """JSON may carry U+2028 (and U+0085, U+2029) unescaped inside a string, as json.dumps(ensure_ascii=False) writes
    it: str.splitlines() cut such a row in two, each half invalid JSON. JSON Lines rows end at "\\n" alone."""
    rows = [{"prompt": "First\u2028line\u0085two\u2029three", "response": "ok"}, {"prompt": "b", "response": "c"}]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    (tmp_path / "eval.jsonl").write_text(json.dumps(rows[1]) + "\r\n")  # written on Windows
    cfg = DataParams(instructions=str(tmp_path / "train.jsonl"), eval_instructions=str(tmp_path / "eval.jsonl"))
    result = run_prepare_data(cfg, StorageParams(), tmp_path / "out")
    assert (result.train_rows, result.eval_rows) == (2, 1)
    assert read_jsonl(tmp_path / "out" / "train.jsonl")[0]["prompt"] == rows[0]["prompt"]


def test_own_data_is_split_when_no_eval_file(tmp_path):
    rows = [{"prompt": f"q{i}", "response": f"a{i}"} for i in range(20)]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = run_prepare_data(DataParams(instructions=str(tmp_path / "rows.jsonl"), eval_fraction=0.25), StorageParams(), tmp_path / "out")
    assert (result.train_rows, result.eval_rows) == (15, 5)


@pytest.mark.parametrize(
    "name, content, expected",
    [
        ("missing.jsonl", None, r"missing\.jsonl: no such file"),
        ("empty.jsonl", "\n\n", r"empty\.jsonl: empty dataset \(no rows\)"),
        ("bad.jsonl", '{"prompt": "a", "response": "b"}\n{"prompt": "a"\n', r"bad\.jsonl: line 2: invalid JSON"),
        ("list.jsonl", '{"prompt": "a", "response": "b"}\n["a", "b"]\n', r"list\.jsonl: line 2: expected a JSON object"),
        ("cols.jsonl", '{"question": "a", "answer": "b"}\n', r"cols\.jsonl: line 1: no known format in its keys "
                                                                  r"\(answer, question\); expected messages \(messages\); alpaca"),
        ("mixed.jsonl", '{"prompt": "a", "response": "b"}\n{"instruction": "c", "output": "d"}\n',
         r"mixed\.jsonl: line 2: the row is alpaca, but the file is prompt_response \(its first row\); a file holds "
         r"one format"),
        ("roles.jsonl", '{"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}\n',
         r"roles\.jsonl: line 1: messages\[1\]: unknown role 'bot'; roles are system, user, assistant"),
        ("unanswered.jsonl", '{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "a"}]}\n',
         r"unanswered\.jsonl: line 1: the conversation must end with an assistant turn"),
        ("order.jsonl", '{"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]}\n',
         r"order\.jsonl: line 1: turns must alternate user, assistant, ... starting with user"),
        ("ragged.csv", "prompt,response\na,b\nc,d,e\n", r"ragged\.csv: line 3: 3 fields, the header has 2"),
        ("header.csv", "prompt\nonly\n", r"header\.csv: line 2: no known format in its keys \(prompt\)"),
        ("latin1.jsonl", b'{"prompt": "caf\xe9", "response": "b"}\n', r"latin1\.jsonl: line 1: not valid UTF-8"),
    ],
)
def test_bad_files_name_file_and_line_and_keep_previous_output(tmp_path, name, content, expected):
    out = tmp_path / "out"
    run_prepare_data(DataParams(**SMALL), StorageParams(), out)
    before = _read(out)
    if content is not None:
        path = tmp_path / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(DataError, match=expected) if content is not None else pytest.raises(StorageError, match=expected):
        run_prepare_data(DataParams(instructions=str(tmp_path / name)), StorageParams(), out)
    assert _read(out) == before


@pytest.mark.services
def test_reads_s3_uris(tmp_path, s3_endpoint, bucket):
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.put_object(Bucket=bucket, Key="in/rows.jsonl", Body=b'{"prompt": "p1", "response": "r1"}\n{"prompt": "p2", "response": "r2"}\n')
    s3.put_object(Bucket=bucket, Key="in/corpus.txt", Body=b"hello corpus\n")
    storage = StorageParams(endpoint_url=s3_endpoint)
    cfg = DataParams(instructions=f"s3://{bucket}/in/rows.jsonl", corpus=f"s3://{bucket}/in/corpus.txt")
    result = run_prepare_data(cfg, storage, tmp_path / "out")
    assert (result.train_rows + result.eval_rows, result.corpus_lines) == (2, 1)
    with pytest.raises(StorageError, match=rf"s3://{bucket}/in/nope.jsonl: no such object"):
        run_prepare_data(DataParams(instructions=f"s3://{bucket}/in/nope.jsonl"), storage, tmp_path / "out")
    with pytest.raises(StorageError, match="cannot reach the S3 endpoint http://127.0.0.1:9"):
        run_prepare_data(cfg, StorageParams(endpoint_url="http://127.0.0.1:9"), tmp_path / "out")


def test_corrections_join_the_train_split_but_never_with_an_eval_prompt(tmp_path):
    run_prepare_data(DataParams(num_examples=50), StorageParams(), tmp_path / "plain")
    eval_prompt = json.loads((tmp_path / "plain/eval.jsonl").read_text().splitlines()[0])["prompt"]
    (tmp_path / "corrections.jsonl").write_text(
        json.dumps({"prompt": "Hi", "response": "Hello.", "task": "correction"}) + "\n"
        + json.dumps({"prompt": eval_prompt, "response": "42", "task": "correction"}) + "\n")
    result = run_prepare_data(DataParams(num_examples=50, corrections=str(tmp_path / "corrections.jsonl")),
                              StorageParams(), tmp_path / "out")
    train = [json.loads(line) for line in (tmp_path / "out/train.jsonl").read_text().splitlines()]
    assert result.train_rows == 46 and train[-1] == {"prompt": "Hi", "response": "Hello.", "task": "correction"}
    assert (tmp_path / "out/eval.jsonl").read_bytes() == (tmp_path / "plain/eval.jsonl").read_bytes()
    assert result.source.endswith("+ 1 corrections from " + str(tmp_path / "corrections.jsonl")
                                  + " (1 left out: their prompts are in the eval split)")
