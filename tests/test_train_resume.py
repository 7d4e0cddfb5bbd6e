"""Checked resume: SIGKILL the training process group mid-run, re-run, continue from the latest complete checkpoint."""

from __future__ import annotations

import csv
import os
import pickle
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import BIN, base_env, run, set_params
from llmops.training import checkpoints

pytestmark = pytest.mark.training
EVERY = 10


def final_loss(project: Path) -> tuple[float, list[int]]:
    with open(project / "reports/train/pretrain/log.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    return float(rows[-1]["loss"]), [int(r["step"]) for r in rows]


def test_killed_run_resumes_from_latest_complete_checkpoint(ran_project):
    project = ran_project
    # the reference: the session's pretraining, the same run never interrupted (checkpoints change no result)
    reference, steps = final_loss(project)
    total = len(steps)
    set_params(project, f"train.pretrain.checkpoint_every={EVERY}", "train.pretrain.keep_checkpoints=2")
    run(["rm", "-rf", "models/pretrain", "reports/train"], project)

    # its own session, so killpg reaches the launcher, torchrun and the training process at once
    ckpt = project / "checkpoints/train/pretrain/checkpoints"
    proc = subprocess.Popen([str(BIN / "llmops"), "train", "pretrain"], cwd=project, env=base_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if any(step >= 2 * EVERY for step, _ in checkpoints.complete(ckpt, _fingerprint(ckpt))):
                break
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    # torchrun puts workers in sessions of their own; they must not train on as orphans
    deadline = time.monotonic() + 10
    while _trainers(project) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _trainers(project)
    assert not (project / "models/pretrain").exists()
    done = checkpoints.complete(ckpt, _fingerprint(ckpt))
    assert len(done) == 2 and done[-1][0] < total

    # what a crash during a save leaves behind must never be loaded
    (ckpt / checkpoints.partial_name(done[-1][0] + EVERY)).mkdir()
    (ckpt / checkpoints.name(done[-1][0] + 2 * EVERY)).mkdir()  # final name, but no complete.json
    # nor a pickle planted in a complete checkpoint: DeepSpeed would unpickle it, and run its code
    marker = project.parent / "pwned"
    planted = done[-1][1] / "mp_rank_00_model_states.pt"
    assert planted.is_file()
    planted.write_bytes(pickle.dumps(_RunsCode(f"touch {marker}")))

    out = run([str(BIN / "llmops"), "train", "pretrain"], project).stdout
    assert f"checkpoint {done[-1][1].name} skipped: its files differ" in out and "mp_rank_00_model_states.pt" in out
    assert f"resumed from step {done[-2][0]}" in out  # the previous complete checkpoint
    assert done[-2][0] > 0 and not marker.exists()
    resumed, steps = final_loss(project)
    assert steps == list(range(1, total + 1))  # one continuous log: rows after the checkpoint were replaced
    with open(project / "reports/train/pretrain/log.csv", newline="") as fh:
        elapsed = [float(r["elapsed_s"]) for r in csv.DictReader(fh)]
    assert elapsed == sorted(elapsed)  # training time goes on across the resume
    # Same batches (a function of seed and step), re-seeded RNG and the restored Adam state make
    # the resumed run the same computation; only float reduction order may differ (~1e-6 in fp32).
    # 1e-3 is below even the loss's step-to-step change here (0.3% to 3%).
    assert resumed == pytest.approx(reference, rel=1e-3)


class _RunsCode:
    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def _trainers(project: Path) -> list[str]:
    """Live training processes of this project (started by torchrun, or forked by the fork server, whose processes
    show their command line as one string)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().replace(b"\0", b" ").split()
        except OSError:
            continue
        if b"llmops.training.trainer" in args and any(str(project).encode() in a for a in args):
            found.append(cmdline.parent.name)
    return found


def _fingerprint(ckpt: Path) -> str:
    """The run's fingerprint, read from the job the launcher wrote."""
    import json

    job = ckpt.parent / "job.json"
    return json.loads(job.read_text())["fingerprint"] if job.exists() else ""
