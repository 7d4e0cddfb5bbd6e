"""Running DVC from the flow: one stage at a time, so dvc.yaml stays the only definition of each stage."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Callable

from pydantic import BaseModel

from llmops.core.errors import LlmopsError

STOP_GRACE_S = 20  # after Ctrl-C, how long the stage may take to end its training processes


class StageError(LlmopsError):
    """A DVC command failed; the message carries the stage's own error (or DVC's)."""


class StageRun(BaseModel):
    stage: str
    skipped: bool  # DVC found nothing changed, or restored the outputs of an identical earlier run (its run-cache)
    log: str


def dvc_env() -> dict[str, str]:
    """The environment for DVC and the stage commands it runs: this interpreter's scripts first on PATH."""
    env = dict(os.environ)
    bin_dir = str(Path(sys.executable).parent)
    if not env.get("PATH", "").startswith(bin_dir + os.pathsep):  # (once: the fork server keys on PATH)
        env["PATH"] = os.pathsep.join([bin_dir, env.get("PATH", "")])
    env.setdefault("DVC_NO_ANALYTICS", "1")
    env["PYTHONUNBUFFERED"] = "1"  # the stage's progress reaches us line by line, not in 8 KiB blocks
    env.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # bars redrawn through a pipe are noise in a log
    return env


def dvc(root: str | os.PathLike, *args: str, what: str | None = None,
        echo: Callable[[str], object] | None = None) -> str:
    """Run `dvc ARGS` in the project `root`, pass each line of its output to `echo` as it comes, return it all.

    DVC and the stage it runs get a process group of their own: if we are interrupted
    (Ctrl-C, a cancelled flow run), the whole group gets SIGINT, as from a terminal, so
    training stops at once and keeps its complete checkpoints; it is killed if it lingers.

    Raises:
        StageError: non-zero exit. The message is the stage's "error:" line and what
            follows it, or DVC's own error, never a wall of traceback.
    """
    proc = subprocess.Popen(
        [sys.executable, "-m", "dvc", *args], cwd=root, env=dvc_env(), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, errors="replace", start_new_session=True,
    )
    lines = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if echo:
                echo(line.rstrip("\n"))
        proc.wait()
    except BaseException:
        _stop(proc)
        raise
    log = "".join(lines)
    if proc.returncode != 0:
        raise StageError(f"{what or 'dvc ' + ' '.join(args)} failed: {reason(log)}")
    return log


def _stop(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGINT, STOP_GRACE_S), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(wait)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def reason(log: str) -> str:
    """The part of a failed command's output a person needs."""
    lines = log.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("error: ")]
    if starts:
        ours = []
        for line in lines[starts[0]:]:
            if line.startswith("ERROR: "):  # DVC's own summary follows the stage's message
                break
            ours.append(line)
        return re.sub(r"^error: [\w@]+: ", "", "\n".join(ours))
    first = next((i for i, line in enumerate(lines) if line.startswith("ERROR: ")), None)
    if first is None:
        return "\n".join(lines[-5:])
    # DVC's message may go on over several lines (a lock names the process blocking it)
    ours = []
    for line in lines[first:]:
        if line.startswith("Having any troubles?"):
            break
        ours.append(line.removeprefix("ERROR: "))
    return "\n".join(ours).strip()


# DVC's hints after each stage ("To track the changes with git, run: ..."): noise in a pipeline's log
_DVC_HINTS = re.compile(r"^(\s*|To track the changes with git, run:|To enable auto staging, run:|\t(git add|dvc config) .*"
                        r"|Use `dvc push` to send your updates to remote storage\.|Updating lock file .*|Generating lock file .*"
                        r"|Stage '.*' didn't change, skipping|Stage '.*' is cached - skipping run, checking out outputs"
                        r"|Data and pipelines are up to date\.)$")


def _print(line: str) -> None:
    print(line)  # looked up at call time: inside a flow, Prefect's log_prints sends it to the run's log too


def repro(root: str | os.PathLike, stage: str, echo: Callable[[str], object] = _print) -> StageRun:
    """Reproduce one stage of dvc.yaml (only that stage; the flow orders them).

    Each line the stage prints (its progress, or its traceback) goes to `echo` as it
    comes: in a flow, to the console and the Prefect run's log.
    """
    log = dvc(root, "repro", "--single-item", stage, what=stage,
              echo=lambda line: None if _DVC_HINTS.match(line) else echo(line))
    unchanged = f"'{stage}' didn't change, skipping" in log
    restored = f"Stage '{stage}' is cached - skipping run" in log
    if unchanged:
        echo(f"{stage}: unchanged since the last run (same code, data and params), skipped")
    elif restored:
        echo(f"{stage}: computed before with the same code, data and params (a run that failed later, or an earlier "
             "version); its outputs restored from DVC's run-cache, skipped")
    return StageRun(stage=stage, skipped=unchanged or restored, log=log)
