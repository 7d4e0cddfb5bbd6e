"""The CLI a person expects (issue 28 point 6): quiet in a pipe, "did you mean", --json and header rows, shell
completion, serve's actions apart from its server's flags, the audit trail (`trail`) apart from the bias audit stage.

In process (llmops.cli.main.main with capsys), the data behind each listing stubbed; only the closed pipe runs a
process of its own."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import BIN, REPO, base_env
from llmops.cli import main as cli
from llmops.cli import output
from llmops.governance.audit import Record
from llmops.pipeline.stage import declared
from llmops.pipeline.workspaces import Workspace
from llmops.registry.versions import Version
from llmops.serving.instances import Server


def refused(capsys, *argv: str) -> str:
    """What the parser says refusing `argv` (argparse exits 2)."""
    with pytest.raises(SystemExit) as raised:
        cli.main(list(argv))
    assert raised.value.code == 2
    return capsys.readouterr().err


@pytest.fixture
def params_here(tmp_path, monkeypatch) -> Path:
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    return tmp_path


# 1. a pipe closed by its reader

def test_output_into_a_pipe_nobody_reads_ends_quietly_with_sigpipes_status(tmp_path):
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first write: `llmops completion bash | true`
    try:
        proc = subprocess.run([str(BIN / "llmops"), "completion", "bash"], cwd=tmp_path, env=base_env(), stdout=write,
                              stderr=subprocess.PIPE, text=True, timeout=120, check=False)
    finally:
        os.close(write)
    assert (proc.returncode, proc.stderr) == (141, "")


# 2. did you mean

@pytest.mark.parametrize("argv, meant", [(["serv"], "serve"), (["reg"], "registry"), (["registry", "lsit"], "list"),
                                         (["serve", "stat"], "status"), (["train", "pretrian"], "pretrain")])
def test_a_mistyped_command_action_or_value_names_the_one_meant(capsys, argv, meant):
    assert f"invalid choice: {argv[-1]!r}, maybe you meant {meant!r}?" in refused(capsys, *argv)


def test_nothing_close_is_suggested_as_nothing(capsys):
    err = refused(capsys, "xyzzy")
    assert "invalid choice: 'xyzzy' (choose from" in err and "maybe" not in err


def test_the_old_audit_command_names_trail_not_the_stage(capsys):
    err = refused(capsys, "audit", "verify")
    assert "'audit' is now 'trail'" in err and "maybe you meant 'audit_bias'" not in err


@pytest.mark.parametrize("override, meant", [("train.finetne.lr=1", "train.finetune"),
                                             ("train.finetune.lrr=1", "train.finetune.lr"),
                                             ("trian.seed=1", "train"),
                                             ("route.replicas=[{url: 'http://h:1', clas: gpu}]",
                                              "route.replicas.0.class")])
def test_an_unknown_params_key_names_the_key_meant(params_here, capsys, override, meant):
    assert cli.main(["params", "-S", override]) == cli.EXIT_BAD_PARAMS
    assert f"unknown key; did you mean {meant}?" in capsys.readouterr().err


def test_an_unknown_params_key_like_no_other_is_only_unknown(params_here, capsys):
    assert cli.main(["params", "-S", "data.zzzzzz=1"]) == cli.EXIT_BAD_PARAMS
    assert capsys.readouterr().err == "error: -S data.zzzzzz: unknown key\n"


# 3. --json and a header row

LISTS = [["registry", "list"], ["registry", "history"], ["workspaces"], ["trail", "log"], ["feedback", "queue"],
         ["serve", "status"], ["serve", "keys"]]
SHOWS = [["registry", "show", "v1"], ["registry", "lineage", "v1"], ["params"], ["explain", "hi"]]


@pytest.mark.parametrize("argv", LISTS + SHOWS, ids=" ".join)
def test_every_command_that_lists_or_shows_takes_json(argv):
    assert cli._parser().parse_args([*argv, "--json"]).json is True


def test_a_table_is_a_header_row_over_aligned_columns_with_empty_cells_shown():
    assert output.table(["NAME", "STAGES", "WHY"], [["v1", "", "a reason"], ["v10", "production", None]]).split("\n") \
        == ["NAME  STAGES      WHY", "v1    -           a reason", "v10   production  -"]


def _listed(capsys, argv: list[str]) -> tuple[list[str], list[dict]]:
    """The human lines and the --json records of one listing."""
    assert cli.main(argv) in (0, 3)
    human = capsys.readouterr().out.splitlines()
    assert cli.main([*argv, "--json"]) in (0, 3)
    return human, [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_registry_list_and_history(monkeypatch, capsys):
    from llmops.cli import registry as registry_cli

    found = [Version("v2.0.0", "c" * 40, "2026-01-02 10:00:00+00:00", "ann", {"by": "ann", "why": "w"}, ["production"]),
             Version("v1.0.0", "d" * 40, "2026-01-01 10:00:00+00:00", "bob", {"by": "bob", "why": "w"}, [])]
    events = [{"time": "2026-01-02 10:00:00+00:00", "event": "assignment", "version": "v2.0.0", "stage": "production",
               "by": "ann", "why": "ship it"}]
    monkeypatch.setattr(registry_cli.registry, "refresh", lambda root: None)
    monkeypatch.setattr(registry_cli.registry, "versions", lambda root: found)
    monkeypatch.setattr(registry_cli.registry, "history", lambda root, stage=None: events)

    human, records = _listed(capsys, ["registry", "list"])
    assert human[0].split() == ["VERSION", "STAGES", "CREATED", "AUTHOR", "SCORES"]
    assert [line.split()[:2] for line in human[1:]] == [["v2.0.0", "production"], ["v1.0.0", "-"]]
    assert [(r["version"], r["commit"], r["stages"], r["by"]) for r in records] == \
        [("v2.0.0", "c" * 40, ["production"], "ann"), ("v1.0.0", "d" * 40, [], "bob")]

    human, records = _listed(capsys, ["registry", "history"])
    assert human[0].split() == ["TIME", "EVENT", "VERSION", "STAGE", "BY", "WHY"]
    assert human[1].split()[2:] == ["assignment", "v2.0.0", "production", "ann", "ship", "it"]
    assert records == events


def test_registry_lineage_json_is_one_document(monkeypatch, capsys):
    from llmops.cli import registry as registry_cli

    v = Version("v1.0.0", "d" * 40, "2026-01-01 10:00:00+00:00", "bob", {"by": "bob", "lineage": {}}, ["production"])
    monkeypatch.setattr(registry_cli.registry, "refresh", lambda root: None)
    monkeypatch.setattr(registry_cli.registry, "resolve", lambda root, ref: v)
    monkeypatch.setattr(registry_cli.registry, "locked_stages", lambda root, commit: {
        "release": {"outs": [{"path": "models/release", "md5": "ab.dir"}, {"path": "reports/x", "md5": "cd"}]}})
    monkeypatch.setattr(registry_cli.registry, "history", lambda root: [])
    monkeypatch.setattr(registry_cli.servers, "running", lambda root: [])
    assert cli.main(["registry", "lineage", "production", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["version"] == "v1.0.0" and shown["outs"] == [{"stage": "release", "path": "models/release",
                                                                "md5": "ab.dir"}]


def test_workspaces(monkeypatch, capsys, tmp_path):
    from llmops.pipeline import workspaces

    kept = [Workspace(path=tmp_path / ".llmops/workspaces/a1", commit="a" * 40)]
    monkeypatch.setattr(workspaces, "kept", lambda root: kept)
    human, records = _listed(capsys, ["workspaces"])
    assert human == ["PATH" + " " * (len(str(kept[0].path)) - 2) + "COMMIT", f"{kept[0].path}  {'a' * 12}"]
    assert records == [{"path": str(kept[0].path), "commit": "a" * 40}]
    monkeypatch.setattr(workspaces, "kept", lambda root: [])
    assert _listed(capsys, ["workspaces"]) == (["no workspaces: every run succeeded, and its workspace was removed"],
                                               [])  # an empty listing in JSON Lines is no line at all


def test_trail_log(monkeypatch, capsys):
    from llmops.cli import trail as trail_cli

    records = [Record(1, "2026-01-01T10:00:00.000+00:00", "ann", "registry.promote", "model", "v1.0.0", "ok",
                      {"stage": "production"}),
               Record(2, "2026-01-01T11:00:00.000+00:00", "bob", "serve.keygen", "ci", None, "ok")]
    monkeypatch.setattr(trail_cli.audit, "records", lambda root: records)
    human, logged = _listed(capsys, ["trail", "log"])
    assert human[0].split() == ["SEQ", "TIME", "WHO", "ACTION", "OUTCOME", "OBJECT", "DETAIL"]
    assert human[1].split() == ["1", "2026-01-01T10:00:00", "ann", "registry.promote", "ok", "model@v1.0.0",
                                "stage=production"]
    assert human[2].split()[-2:] == ["ci", "-"]
    assert [r["seq"] for r in logged] == [1, 2] and logged[0]["detail"] == {"stage": "production"}


def test_serve_status_and_keys(monkeypatch, capsys):
    from llmops.cli import serve as serve_cli

    up = Server(pid=42, url="http://127.0.0.1:8000/v1", port=8000, ref="production", model="model", version="v1.0.0",
                started="2026-01-01T10:00:00.000+00:00", loaded="2026-01-01T10:00:00.000+00:00")
    monkeypatch.setattr(serve_cli.servers, "running", lambda root: [up])
    human, records = _listed(capsys, ["serve", "status"])
    assert human[0].split() == ["URL", "PID", "SINCE", "SERVES"]
    assert "model v1.0.0, follows production" in human[1] and human[1].split()[:2] == [up.url, "42"]
    assert [(r["url"], r["version"], r["ref"]) for r in records] == [(up.url, "v1.0.0", "production")]
    monkeypatch.setattr(serve_cli.servers, "running", lambda root: [])
    assert cli.main(["serve", "status", "--json"]) == 3 and capsys.readouterr().out == ""

    monkeypatch.setattr(serve_cli.apikeys, "load", lambda path: {"h1": "chatbot", "h2": "ci"})
    assert _listed(capsys, ["serve", "keys"]) == (["chatbot", "ci"], [{"name": "chatbot"}, {"name": "ci"}])


def test_feedback_queue_json(monkeypatch, capsys, tmp_path):
    from llmops.cli import monitor as monitor_cli

    monkeypatch.chdir(tmp_path)
    queue = [{"request_id": "cmpl-1", "why": "rated 1", "task": "math", "prompt": "1+1?", "answer": "3",
              "suggested": "2"}]
    monkeypatch.setattr(monitor_cli, "latest_queue", lambda root: queue)
    assert cli.main(["feedback", "queue", "--json"]) == 0
    assert [json.loads(line) for line in capsys.readouterr().out.splitlines()] == queue


def test_params_json_is_the_values_as_one_document(params_here, capsys):
    assert cli.main(["params", "--json", "-S", "data.num_examples=123"]) == 0
    assert json.loads(capsys.readouterr().out)["data"]["num_examples"] == 123


# 4. shell completion

@pytest.mark.parametrize("shell", ["bash", "zsh"])
def test_completion_knows_the_commands_their_actions_and_the_stages(capsys, shell):
    assert cli.main(["completion", shell]) == 0
    script = capsys.readouterr().out
    for command in ("trail", "serve_keygen", "serve_start", *declared()):  # shtab's name for each one's completions
        assert f"_shtab_llmops_{command}_" in script, command
    assert "--max-concurrency" in script


# 5. serve: actions apart from the server's flags

def test_serve_start_takes_the_servers_flags():
    args = cli._parser().parse_args(["serve", "start", "--model", "m", "--port", "9", "--device", "cpu"])
    assert (args.serve_action, args.model, args.port, args.device) == ("start", "m", 9, "cpu")
    assert cli._parser().parse_args(["serve", "keygen", "ci"]).name == "ci"


@pytest.mark.parametrize("action, flag", [("status", "--model=m"), ("keygen ci", "--port=1"), ("stop", "--adapters"),
                                          ("manifests", "--privacy=mask"), ("keys", "--name=ci")])
def test_a_servers_flag_is_refused_with_an_action(capsys, action, flag):
    assert f"unrecognized arguments: {flag}" in refused(capsys, "serve", *action.split(), flag)


def test_the_old_serve_forms_are_refused(capsys):
    assert "invalid choice: 'm'" in refused(capsys, "serve", "--model", "m")
    assert "unrecognized arguments: --name" in refused(capsys, "serve", "keygen", "--name", "ci")


def test_each_serve_action_has_help_of_its_own(capsys):
    with pytest.raises(SystemExit):
        cli.main(["serve", "status", "--help"])
    status = capsys.readouterr().out
    assert "--json" in status and "--max-concurrency" not in status and "--name" not in status


def test_a_deploy_starts_its_server_with_a_command_the_parser_takes(monkeypatch, tmp_path):
    from llmops.serving import instances

    started = []

    def popen(argv, **kwargs):
        started.append(argv)
        raise RuntimeError("not started")

    monkeypatch.setattr(instances.subprocess, "Popen", popen)
    with pytest.raises(RuntimeError):
        instances.start(tmp_path, "production", "127.0.0.1", instances.free_port(), 4, 1.0, adapters=True)
    args = cli._parser().parse_args(started[0][1:])
    assert (args.serve_action, args.version, args.adapters) == ("start", "production", True)


# 6. the audit trail apart from the bias audit stage

def test_the_help_lists_stages_apart_from_commands(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    commands, _, stages = capsys.readouterr().out.partition("stages, in pipeline order")
    listed = {line.split()[0] for line in commands.split("commands:")[1].splitlines()[2:] if line.startswith("    ")
              and not line.startswith("     ")}
    assert {"run", "trail", "serve", "registry", "completion"} <= listed
    assert not listed & set(declared()) and "audit" not in listed
    assert [line.split()[0] for line in stages.splitlines()[1:] if line.startswith("  ") and line[2] != " "] \
        == list(declared())


def test_trail_verify_is_the_trails_and_audit_bias_the_stages():
    assert cli._parser().parse_args(["trail", "verify"]).trail_command == "verify"
    assert cli._parser().parse_args(["audit_bias"]).command == "audit_bias"
