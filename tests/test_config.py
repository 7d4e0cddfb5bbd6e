"""params.yaml is parsed into pydantic models: bad keys, types and combinations fail before any work."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import REPO, base_env, run, set_params
from llmops.core.config import ConfigError, Params, StorageParams, load_params, storage_from_env, write_params

# YAML files that are not params, each checked by its own tool elsewhere in the suite.
OTHER_YAML = {
    "dvc.yaml": "test_dvc.py (dvc repro)",
    "dvc.lock": "written by DVC",
    "deployments/prefect.yaml": "test_flow.py (prefect deploy)",
    "mkdocs.yml": "the docs site (mkdocs build --strict in .ci/run)",
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
        ("validate_data:\n  pii: [email, passport]\n", [], "validate_data.pii.1: Input should be"),
        ("", ["data.num_examples=abc"], "-S data.num_examples: Input should be a valid integer"),
        ("", ["data.nope=1"], "-S data.nope: unknown key"),
        ("", ["data.seed"], "-S data.seed: expected KEY=VALUE"),
        # numpy refuses seeds outside [0, 2**32): refused here, before any work, not as a stage's traceback
        ("", ["train.finetune.seed=-1"], "-S train.finetune.seed: Input should be greater than or equal to 0"),
        ("", [f"evaluate.seed={2**32}"], "-S evaluate.seed: Input should be less than 4294967296"),
        ("data:\n  seed: 3\n", ["data.seed.x=1"], "-S data.seed.x: data.seed is a value, not a section"),
        ("data: [1, 2\n", [], "params.yaml: line 2: malformed YAML"),
        ("gate:\n  min_exact_match: 0.4\n", [], "params.yaml: gate.min_exact_match: unknown key (renamed gate.min_score"),
        ("train:\n  pretrain:\n    continue_pretraining: true\n", [],
         "params.yaml: train.pretrain.continue_pretraining: needs a named train.finetune.base_model"),
        ("evaluate:\n  metrics: [bleu]\n", [], "params.yaml: evaluate.metrics.0: Input should be"),
        ("train:\n  finetune:\n    prompt_overflow: skip\n", [], "train.finetune.prompt_overflow: Input should be"),
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


def test_output_into_a_closed_pipe_ends_quietly(project):
    """`llmops params | head`: the reader left first; no traceback, and the exit status a shell gives SIGPIPE."""
    import subprocess

    from conftest import BIN

    proc = subprocess.run(["bash", "-c", f"'{BIN / 'llmops'}' params | true; echo ${{PIPESTATUS[0]}}"], cwd=project,
                          env=base_env(), capture_output=True, text=True)
    assert proc.stderr == "" and proc.stdout.strip() == "141", proc.stderr


def test_write_params_changes_only_the_overridden_lines(tmp_path):
    original = (REPO / "params.yaml").read_text()
    path = _params(tmp_path, original)
    params = load_params(path, ["train.finetune.lr=0.0005", "train.finetune.lora.target_modules=[q_proj, v_proj]"])
    assert write_params(path, params) == ["train.finetune.lora.target_modules", "train.finetune.lr"]
    old, new = original.splitlines(), path.read_text().splitlines()
    assert len(old) == len(new)
    changed = [(a, b) for a, b in zip(old, new) if a != b]
    # exactly the two keys, in the file's own style; every null, comment and list elsewhere untouched
    assert [b.split("#")[0].strip() for _, b in changed] == ["target_modules: [q_proj, v_proj]", "lr: 0.0005"]
    assert load_params(path) == params
    assert write_params(path, params) == []


@pytest.mark.parametrize("override, expected", [
    ("train.pretrain.lr=1e30", "-S train.pretrain.lr: Input should be less than or equal to 1"),
    ("train.pretrain.lr=.inf", "-S train.pretrain.lr: Input should be"),
    ("train.finetune.lr=.nan", "-S train.finetune.lr: Input should be"),
    ("data.num_examples=1000000000000000000", "-S data.num_examples: Input should be less than or equal to"),
    ("train.pretrain.steps=1000000000000000000", "-S train.pretrain.steps: Input should be less than or equal to"),
    ("train.finetune.max_seq_len='128'", "-S train.finetune.max_seq_len: Input should be a valid integer (got '128')"),
])
def test_values_that_can_only_be_mistakes_are_refused(tmp_path, override, expected):
    with pytest.raises(ConfigError) as exc:
        load_params(_params(tmp_path, ""), [override])
    assert str(exc.value).startswith(expected), str(exc.value)


def test_a_quoted_number_in_the_file_is_a_type_error(tmp_path):
    with pytest.raises(ConfigError, match=r"params.yaml: train.pretrain.max_seq_len: Input should be a valid integer"):
        load_params(_params(tmp_path, 'train:\n  pretrain:\n    max_seq_len: "128"\n'))


def test_non_utf8_params_file_is_one_clear_line(project):
    path = project / "params.yaml"
    path.write_bytes(path.read_bytes().replace(b"# The single", b"# The s\xe9ngle", 1))
    for args in (["params"], ["prepare_data"], ["run"]):
        proc = run(["llmops", *args], project, check=False)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
        assert "params.yaml: line 1: not valid UTF-8" in proc.stderr and "Traceback" not in proc.stderr


def test_params_command_shows_what_a_run_uses_env_included(project):
    env = base_env(LLMOPS_S3_BUCKET="team-bucket", LLMOPS_S3_ENDPOINT_URL="http://127.0.0.1:9")
    out = run(["llmops", "params", "-S", "data.seed=7"], project, env=env).stdout
    assert "seed: 7" in out and "bucket: team-bucket" in out and "remote: s3" in out
    assert "endpoint_url: http://127.0.0.1:9" in out
    assert "team-bucket" not in (project / "params.yaml").read_text()  # shown, never written


def test_version(project):
    from importlib.metadata import version

    assert run(["llmops", "--version"], project).stdout.strip() == f"llmops {version('llmops')}"


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


def test_each_project_gets_a_local_remote_of_its_own(tmp_path):
    from llmops.core.config import storage_for

    def repo(path: Path, message: str) -> Path:
        path.mkdir()
        run(["git", "init", "-q"], path)
        run(["git", "commit", "-q", "--allow-empty", "-m", message], path)
        return path

    one, other = repo(tmp_path / "one", "first"), repo(tmp_path / "other", "another project")
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(one), str(clone)], tmp_path)
    first = run(["git", "rev-list", "--max-parents=0", "HEAD"], one).stdout.strip()
    url = storage_for(StorageParams(), one).url
    assert url == f"~/.cache/llmops/dvc-remote/{first[:12]}"
    assert storage_for(StorageParams(), other).url != url  # another project: another remote
    assert storage_for(StorageParams(), clone).url == url  # a clone, under another name, finds the data
    assert storage_for(StorageParams(local_dir="/srv/remote"), one).url == "/srv/remote"


def test_unreachable_prefect_server_is_one_line(project):
    proc = run(["llmops", "run"], project, env=base_env(PREFECT_API_URL="http://127.0.0.1:9/api"), check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip() == (
        "error: no Prefect server answers at PREFECT_API_URL=http://127.0.0.1:9/api; start it "
        "(`prefect server start`) or unset PREFECT_API_URL to use a local one for this run")
    assert not (project / "data/prepared").exists()
