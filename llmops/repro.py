"""Running DVC from the flow: one stage at a time, so dvc.yaml stays the only definition of each stage."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from pydantic import BaseModel


class StageError(Exception):
    """A DVC command failed; the message carries the stage's own error (or DVC's)."""


class StageRun(BaseModel):
    stage: str
    skipped: bool  # DVC found nothing changed and reused the cached outputs
    log: str


def dvc_env() -> dict[str, str]:
    """The environment for DVC and the stage commands it runs: this interpreter's scripts first on PATH."""
    env = dict(os.environ)
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([bin_dir, env.get("PATH", "")])
    env.setdefault("DVC_NO_ANALYTICS", "1")
    return env


def dvc(root: str | os.PathLike, *args: str, what: str | None = None) -> str:
    """Run `dvc ARGS` in the project `root` and return its output.

    Raises:
        StageError: non-zero exit. The message is the stage's "error:" line and what
            follows it, or DVC's own ERROR lines, never a wall of traceback.
    """
    proc = subprocess.run(
        [sys.executable, "-m", "dvc", *args], cwd=root, env=dvc_env(), capture_output=True, text=True
    )
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise StageError(f"{what or 'dvc ' + ' '.join(args)} failed: {reason(log)}")
    return log


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
        return re.sub(r"^error: \w+: ", "", "\n".join(ours))
    dvc_errors = [line.removeprefix("ERROR: ") for line in lines if line.startswith("ERROR: ")]
    return "\n".join(dvc_errors) or "\n".join(lines[-5:])


def repro(root: str | os.PathLike, stage: str) -> StageRun:
    """Reproduce one stage of dvc.yaml (only that stage; the flow orders them)."""
    log = dvc(root, "repro", "--single-item", stage, what=stage)
    return StageRun(stage=stage, skipped=f"'{stage}' didn't change, skipping" in log, log=log)
