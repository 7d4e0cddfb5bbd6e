"""A failed, refused or interrupted run leaves the checkout (outputs, dvc.lock, params.yaml) as it was: every run
builds in a workspace of its own and lands there only once its model is registered."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import BIN, base_env, run, set_params, snapshot

pytestmark = [pytest.mark.services, pytest.mark.training]

OUTPUTS = ("data/prepared", "models", "reports", "dvc.lock")


def llmops_run(project: Path, *args: str, env: dict | None = None):
    return run([str(BIN / "llmops"), "run", "--no-push", *args], project, env=env, check=False)


def params_diff(project: Path) -> str:
    return run(["git", "diff", "params.yaml"], project).stdout


@pytest.mark.parametrize("override, says", [
    ("data.instructions=/nope.jsonl", "data.instructions: /nope.jsonl: no such file"),
    ("evaluate.harness_tasks=[evals/nope.yaml]",
     "evaluate.harness_tasks: evals/nope.yaml: no such file (a task YAML in lm-eval's format)")])
def test_missing_input_is_refused_before_prefect_or_dvc_start(ran_project, override, says):
    before = snapshot(ran_project, *OUTPUTS)
    started = time.monotonic()
    proc = llmops_run(ran_project, "-S", override)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: {says}"
    assert time.monotonic() - started < 20
    assert not (ran_project / ".llmops/prefect").exists()  # no Prefect server was started
    assert snapshot(ran_project, *OUTPUTS) == before and params_diff(ran_project) == ""


@pytest.mark.parametrize("case", ["empty_file", "training_refused"])  # a malformed file: through dvc repro below
def test_failed_flow_run_keeps_outputs_and_puts_params_back(ran_project, case):
    before = snapshot(ran_project, *OUTPUTS)
    if case == "training_refused":  # the examples do not fit: train@finetune stops before launching
        args = ["-S", "train.finetune.max_seq_len=8"]
    else:
        data = ran_project / "mine.jsonl"
        data.write_text("")
        args = ["-S", "data.instructions=mine.jsonl", "-S", "governance.data_licence=MIT"]
    proc = llmops_run(ran_project, *args)
    assert proc.returncode == 1, proc.stderr  # the run failed (its stage was refused before any training)
    message = next(line for line in proc.stderr.splitlines() if line.startswith("error: "))  # after Prefect's log
    expected = {"empty_file": "prepare_data failed: mine.jsonl: empty dataset",
                "training_refused": "train@finetune failed: data/prepared/train.jsonl: 360 of 360 examples are "
                                    "longer than max_seq_len (8 tokens"}[case]
    assert message.startswith(f"error: pipeline failed: {expected}"), proc.stderr
    assert message.count("error: ") == 1 and message.count("failed: ") == 2  # each part is said once
    assert "NoneType: None" not in proc.stdout + proc.stderr
    assert snapshot(ran_project, *OUTPUTS) == before  # the failed stage's outputs, and all others, as they were
    assert params_diff(ran_project) == ""  # the run's -S values did not stay behind


def test_a_run_lands_all_or_nothing_and_the_next_reuses_what_a_failed_one_computed(ran_project):
    project = ran_project
    before = snapshot(project, *OUTPUTS)
    # evaluate and quantize run (their param changed) and succeed, then the gate refuses the release
    proc = llmops_run(project, "-S", "evaluate.max_new_tokens=4", "-S", "gate.min_score=0.99")
    assert proc.returncode == 1 and "gate failed" in proc.stderr and "the checkout is as it was" in proc.stderr
    assert snapshot(project, *OUTPUTS) == before and params_diff(project) == ""  # not one of the three changed

    proc = llmops_run(project, "-S", "evaluate.max_new_tokens=4")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    for stage in ("evaluate", "quantize"):  # what the failed run computed, from DVC's run-cache
        assert f"{stage}: computed before with the same code, data and params" in out
    assert "the checkout now holds this run's outputs, dvc.lock and params.yaml" in out
    assert re.search(r"^\+ +max_new_tokens: 4\b", params_diff(project), re.M), params_diff(project)
    assert before["reports/evaluate/metrics.json"] != (project / "reports/evaluate/metrics.json").read_bytes()
    status = run(["dvc", "status"], project).stdout  # outputs, dvc.lock and params.yaml agree
    assert status.split() == ["inputs:", "always", "changed"], status
    kept = run([str(BIN / "llmops"), "workspaces"], project).stdout.splitlines()[1:]  # under the header
    assert len(kept) == 1 and "min_score: 0.99" in (Path(kept[0].split()[0]) / "params.yaml").read_text()  # the failed
    # a workspace's records speak for its checkout, whose repository holds their anchors
    records = [json.loads(line) for line in run([str(BIN / "llmops"), "trail", "log", "--json"], project).stdout
               .splitlines()]
    assert [r for r in records if r["action"] == "stage.evaluate"][-1]["detail"]["where"].endswith(f":{project}")
    assert "intact" in run([str(BIN / "llmops"), "trail", "verify"], project).stdout


def test_a_checkout_edited_while_a_run_builds_is_not_overwritten(ran_project, tmp_path):
    project = ran_project
    lock = (project / "dvc.lock").read_text()
    out = open(tmp_path / "run.log", "w+")
    first = subprocess.Popen([str(BIN / "llmops"), "run", "--no-push", "-S", "evaluate.max_new_tokens=4"], cwd=project,
                             env=base_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        # the run holds its workspace's lock once the checkout is copied there
        _wait_for(lambda: any((project / ".llmops/workspaces").glob("*/.llmops/run.lock")), 120, first)
        params = project / "params.yaml"
        edited = params.read_text() + "# a person's note, written while the run evaluates\n"
        params.write_text(edited)
        first.wait(600)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    out.seek(0)
    log = out.read()
    assert first.returncode == 1, log
    assert "params.yaml changed in the checkout while the run built; nothing of the run was put there" in log
    assert params.read_text() == edited and (project / "dvc.lock").read_text() == lock
    assert "registry.register" not in run([str(BIN / "llmops"), "trail", "log"], project).stdout  # nothing registered


def test_a_plain_dvc_repro_that_fails_leaves_dvc_checkout_to_restore(ran_project):
    """A plain `dvc repro` in the checkout is DVC's own: a stage's outputs are removed before it runs, and after a
    failure `dvc checkout` puts the last good ones back from the cache, byte for byte."""
    before = snapshot(ran_project, "data/prepared", "models")
    (ran_project / "mine.jsonl").write_text('{"prompt": "a", "response": "b"}\n{"prompt": \n')
    set_params(ran_project, "data.instructions=mine.jsonl")
    proc = run(["dvc", "repro"], ran_project, check=False)
    assert proc.returncode != 0 and "mine.jsonl: line 2: invalid JSON" in proc.stdout + proc.stderr
    run(["dvc", "checkout", "--force"], ran_project)
    assert snapshot(ran_project, "data/prepared", "models") == before


def _wait_for(predicate, seconds: float, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert proc.poll() is None, f"the run ended early ({proc.returncode})"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def test_second_run_is_refused_and_ctrl_c_stops_the_first_cleanly(ran_project, tmp_path):
    # long enough that the interrupt always lands in pretraining, however fast the machine
    set_params(ran_project, "train.pretrain.steps=20000", "train.pretrain.checkpoint_every=20")
    run(["git", "commit", "-qam", "a long pretraining"], ran_project)
    before = snapshot(ran_project, *OUTPUTS)
    out = open(tmp_path / "first.log", "w+")
    # a session of its own: SIGINT to its process group is what Ctrl-C in a terminal sends
    first = subprocess.Popen([str(BIN / "llmops"), "run", "--no-push", "-S", "train.pretrain.seed=1"], cwd=ran_project,
                             env=base_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    ckpt = ran_project / "checkpoints/train/pretrain/checkpoints"
    try:
        _wait_for(lambda: ckpt.is_dir() and any(p.name.startswith("step-") for p in ckpt.iterdir()), 300, first)

        second = llmops_run(ran_project, "-S", "data.seed=2")
        assert second.returncode == 1
        assert second.stderr.strip().startswith(
            f"error: `llmops run` is already running in this checkout (pid {first.pid}, since ")
        # the holder by its command, not its values (a lock file must not keep an `erase --subject` or a secret)
        assert ": llmops run); wait for it to end" in second.stderr and "seed" not in second.stderr

        os.killpg(first.pid, signal.SIGINT)
        started = time.monotonic()
        first.wait(90)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    assert time.monotonic() - started < 60
    out.seek(0)
    log = out.read()
    assert first.returncode == 130, log
    tail = log.strip().splitlines()[-1]
    assert tail.startswith("interrupted: the run stopped"), log
    assert "httpx.ConnectError" not in log and "Error logging to API" not in log
    assert [p.name for p in ckpt.iterdir() if p.name.startswith("step-")]  # complete checkpoints kept, the checkout's
    assert not _live(ran_project)  # no training process, DVC or Prefect server left behind
    assert params_diff(ran_project) == "" and snapshot(ran_project, *OUTPUTS) == before


def _building(project: Path) -> bool:
    """A run's workspace holds its first output: the flow is running its stages."""
    return any((project / ".llmops/workspaces").glob("*/data/prepared"))


def _live(project: Path) -> list[str]:
    """Command lines of our processes (llmops, DVC, the Prefect server) still running in the project."""
    return [args for _, args in _processes(project) if "llmops" in args or "dvc" in args or "uvicorn" in args]


def _processes(project: Path) -> list[tuple[int, str]]:
    """(pid, command line) of every process whose working directory is in the project."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if os.readlink(proc / "cwd").startswith(str(project)):
                args = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                found.append((int(proc.name), args))
        except OSError:
            continue
    return found


def test_sigterm_ends_a_run_as_ctrl_c_does(project):
    """A supervisor's SIGTERM takes the path of Ctrl-C (tested with training above): one line, nothing left running."""
    proc = subprocess.Popen([str(BIN / "llmops"), "run", "--no-push"], cwd=project, env=base_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        _wait_for(lambda: _building(project), 300, proc)  # the flow is running its stages
        proc.terminate()  # to the run alone, as a supervisor does
        out, _ = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130 and out.strip().splitlines()[-1].startswith("interrupted: the run stopped"), out
    assert not _live(project)  # DVC, the stage and the Prefect server ended with it
    assert not (project / "data/prepared").exists() and not (project / "dvc.lock").exists()  # nothing landed


def test_prefect_server_does_not_outlive_a_killed_run(project, tmp_path):
    proc = subprocess.Popen([str(BIN / "llmops"), "run", "--no-push"], cwd=project, env=base_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    servers = lambda: [a for a in _live(project) if "prefect_api" in a or "uvicorn" in a]  # noqa: E731
    try:
        _wait_for(lambda: servers() and _building(project), 300, proc)
        proc.kill()  # SIGKILL: no handler of ours runs
        proc.wait()
        deadline = time.monotonic() + 20
        while servers() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not servers()
    finally:
        for pid, _ in _processes(project):
            os.kill(pid, signal.SIGKILL)


def test_own_data_without_a_stated_licence_is_refused_before_any_work(ran_project):
    """Registration refuses a model built on data whose licence nobody stated: the run refuses it before training."""
    (ran_project / "mine.jsonl").write_text("".join(json.dumps({"prompt": f"{i} + 1?", "response": str(i + 1)}) + "\n"
                                                    for i in range(20)))
    before = snapshot(ran_project, *OUTPUTS)
    proc = llmops_run(ran_project, "-S", "data.instructions=mine.jsonl")
    assert proc.returncode == 2, proc.stderr
    assert "data.instructions (mine.jsonl), licensed NOASSERTION, which deploy.allowed_licences" in proc.stderr
    assert "governance.data_licence" in proc.stderr and "Traceback" not in proc.stderr
    assert snapshot(ran_project, *OUTPUTS) == before and params_diff(ran_project) == ""
