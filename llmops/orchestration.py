"""`llmops setup`: make a Prefect server ready to run the pipeline: the work pool, and the deployments of
deployments/prefect.yaml (schedules, typed parameters), registered for this checkout.

Through Prefect's own CLI, as a person would type it, so what runs is what the docs describe.
A process worker (`prefect worker start --pool llmops`) on this machine then runs each flow run
in a workspace of the commit it names (see llmops/workspaces.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from llmops.errors import LlmopsError

DEPLOYMENTS = Path("deployments/prefect.yaml")
POOL = "llmops"  # deployments/prefect.yaml's work pool


class SetupError(LlmopsError):
    """The Prefect server could not be set up; the message says which step failed and why."""


def _prefect(root: Path, *args: str, env: dict[str, str]) -> str:
    proc = subprocess.run([str(Path(sys.executable).parent / "prefect"), *args], cwd=root, env=env,
                          capture_output=True, text=True)
    if proc.returncode:
        said = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
        raise SetupError(f"`prefect {' '.join(args)}` failed: {said[-1] if said else proc.returncode}")
    return proc.stdout


def setup(root: str | os.PathLike) -> list[str]:
    """Create (or update) the work pool and register the deployments; returns what was done, a line each.

    Raises:
        SetupError: no Prefect server named (PREFECT_API_URL), or a step failed.
    """
    root = Path(root).resolve()
    env = dict(os.environ)
    if not env.get("PREFECT_API_URL"):
        raise SetupError("PREFECT_API_URL is not set: name the Prefect server the worker and the UI use "
                         "(`prefect server start`, then export PREFECT_API_URL=http://127.0.0.1:4200/api)")
    env["LLMOPS_PROJECT_DIR"] = str(root)  # deployments/prefect.yaml's pull step: the worker runs flows here
    done = []
    _prefect(root, "work-pool", "create", POOL, "--type", "process", "--overwrite", env=env)
    done.append(f"work pool {POOL!r} (process): ready")
    out = _prefect(root, "--no-prompt", "deploy", "--prefect-file", str(DEPLOYMENTS), "--all", env=env)
    names = [line.split("'")[1] for line in out.splitlines() if "Deployment '" in line and "successfully" in line]
    done += [f"deployment {name!r}: registered for {root}" for name in names]
    done.append(f"start a worker on this machine: prefect worker start --pool {POOL}")
    return done
