"""params.yaml is parsed into pydantic models: bad keys, types and combinations fail before any work."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import REPO, run, set_params
from llmops.config import ConfigError, Params, StorageParams, load_params, storage_from_env, write_params

# YAML files that are not params, each checked by its own tool elsewhere in the suite.
OTHER_YAML = {
    "dvc.yaml": "test_dvc.py (dvc repro)",
    "dvc.lock": "written by DVC",
    "deployments/prefect.yaml": "test_flow.py (prefect deploy)",
}


def test_every_yaml_config_in_the_repository_loads_against_the_schema():
    found = [
        p for p in REPO.rglob("*.y*ml")
        if not {".venv", ".git", "node_modules", ".dvc"} & set(p.relative_to(REPO).parts)
        and not p.relative_to(REPO).parts[0].startswith(".")
    ]
    params_files = [p for p in found if str(p.relative_to(REPO)) not in OTHER_YAML]
    assert REPO / "params.yaml" in params_files and len(params_files) >= 2
    for path in params_files:
        load_params(path)


def test_defaults_match_the_schema_defaults():
    assert load_params(REPO / "params.yaml") == Params()


def _params(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "text, overrides, expected",
    [
        ("data:\n  num_exampels: 5\n", [], "params.yaml: data.num_exampels: unknown key"),
        ("trian:\n  lr: 1\n", [], "params.yaml: trian: unknown key"),
        ("data:\n  num_examples: lots\n", [], "params.yaml: data.num_examples: Input should be a valid integer"),
        ("data:\n  eval_fraction: 1.5\n", [], "params.yaml: data.eval_fraction: Input should be less than 1"),
        ("storage:\n  remote: s3\n", [], "params.yaml: storage.bucket: required when storage.remote is 's3'"),
        ("data:\n  eval_instructions: e.jsonl\n", [], "data.eval_instructions: set only together with data.instructions"),
        ("validate_data:\n  min_chars: 50\n  max_prompt_chars: 10\n", [], "validate_data.max_prompt_chars: must be >= validate_data.min_chars"),
        ("data:\n  instructions: rows.parquet\n", [], "data.instructions: 'rows.parquet': expected a file ending in .jsonl or .csv"),
        ("validate_data:\n  pii: [email, ssn]\n", [], "validate_data.pii.1: Input should be"),
        ("", ["data.num_examples=abc"], "-S data.num_examples: Input should be a valid integer"),
        ("", ["data.nope=1"], "-S data.nope: unknown key"),
        ("", ["data.seed"], "-S data.seed: expected KEY=VALUE"),
        ("data:\n  seed: 3\n", ["data.seed.x=1"], "-S data.seed.x: data.seed is a value, not a section"),
        ("data: [1, 2\n", [], "params.yaml: line 2: malformed YAML"),
    ],
)
def test_bad_params_name_the_dotted_key(tmp_path, text, overrides, expected):
    with pytest.raises(ConfigError) as exc:
        load_params(_params(tmp_path, text), overrides)
    assert expected in str(exc.value)
    assert len(str(exc.value).splitlines()) == 1


def test_overrides_go_through_the_same_validation(tmp_path):
    params = load_params(_params(tmp_path, "data:\n  seed: 1\n"), ["data.num_examples=500", "validate_data.max_duplicate_rate=5e-2"])
    assert params.data.num_examples == 500 and params.data.seed == 1
    assert params.validate_data.max_duplicate_rate == 0.05


def test_cli_refuses_bad_params_with_exit_2_before_any_work(project):
    for args, expected in [
        (["-S", "data.num_examples=abc"], "error: -S data.num_examples: Input should be a valid integer"),
        (["-S", "data.unknown=1"], "error: -S data.unknown: unknown key"),
    ]:
        proc = run(["llmops", "run", *args], project, check=False)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.strip().splitlines() == [proc.stderr.strip().splitlines()[0]]
        assert proc.stderr.startswith(expected)
    (project / "params.yaml").write_text((project / "params.yaml").read_text().replace("  seed: 0", "  sed: 0", 1))
    proc = run(["llmops", "prepare_data"], project, check=False)
    assert proc.returncode == 2 and "params.yaml: data.sed: unknown key" in proc.stderr
    assert not (project / "data" / "prepared").exists()


def test_every_subcommand_has_help(project):
    top = run(["llmops", "--help"], project).stdout
    for command in ("run", "params", "prepare_data", "validate_data"):
        assert command in top
        assert run(["llmops", command, "--help"], project).stdout.startswith("usage: llmops " + command)


def test_write_params_keeps_comments_and_round_trips(tmp_path):
    path = _params(tmp_path, (REPO / "params.yaml").read_text())
    params = load_params(path, ["data.num_examples=123"])
    assert write_params(path, params) is True
    text = path.read_text()
    assert "# The single source of truth" in text and "num_examples: 123" in text
    assert load_params(path) == params
    assert write_params(path, params) is False


def test_storage_from_environment():
    storage = storage_from_env(StorageParams(), {"LLMOPS_S3_BUCKET": "b", "LLMOPS_S3_ENDPOINT_URL": "http://127.0.0.1:9"})
    assert (storage.remote, storage.url, storage.endpoint_url) == ("s3", "s3://b/llmops", "http://127.0.0.1:9")
    assert storage_from_env(StorageParams(), {}) == StorageParams()


def test_stage_cli_reports_a_bad_data_file_with_file_and_line(project):
    (project / "mine.jsonl").write_text('{"prompt": "a", "response": "b"}\n{"prompt": "c", "response": \n')
    set_params(project, "data.instructions=mine.jsonl")
    proc = run(["llmops", "prepare_data"], project, check=False)
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: prepare_data: mine.jsonl: line 2: invalid JSON")
    assert "Traceback" not in proc.stderr and not (project / "data" / "prepared").exists()
