"""`llmops setup`: make a Prefect server ready to run the pipeline: the work pool, the global concurrency limit
(orchestration.concurrency_limit), and the deployments of deployments/prefect.yaml (schedules, typed
parameters), registered for this checkout. And `one_run_at_a_time`, the flow's hold on that limit.

Through Prefect's own CLI, as a person would type it, so what runs is what the docs describe.
A process worker (`prefect worker start --pool llmops`) on this machine then runs each flow run
in a workspace of the commit it names (see llmops/pipeline/workspaces.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterator

from llmops.core.config import PARAMS_FILE, OrchestrationParams, load_params
from llmops.core.errors import LlmopsError
from llmops.pipeline.prefect_api import OWN

DEPLOYMENTS = Path("deployments/prefect.yaml")
POOL = "llmops"  # deployments/prefect.yaml's work pool


class SetupError(LlmopsError):
    """The Prefect server could not be set up; the message says which step failed and why."""


class Busy(LlmopsError):
    """Another run holds the concurrency limit and orchestration.on_busy says skip."""


@contextmanager
def one_run_at_a_time(params: OrchestrationParams, strict: bool) -> Iterator[None]:
    """Hold one slot of the global concurrency limit for the block: wait for it, or raise Busy (on_busy: skip).

    `strict`: a limit missing on the server is an error (a deployment's run: `llmops setup` creates it);
    otherwise the run goes on without it, saying so (a `llmops run` against a server that was never set up).
    """
    from prefect.concurrency.asyncio import AcquireConcurrencySlotTimeoutError, ConcurrencySlotAcquisitionError
    from prefect.concurrency.sync import concurrency

    name = params.concurrency_limit
    if name is None:
        yield
        return
    if not strict and not _limit_exists(name):
        if os.environ.get(OWN) is None:  # a shared server that was never set up (a run's own has no other runs)
            print(f"no concurrency limit {name!r} on this Prefect server (`llmops setup` makes it): this run does "
                  "not wait for other runs")
        yield
        return
    # a lease the server renews while the run lasts (a crashed run frees it when the lease expires); a renewal
    # that fails once must not kill hours of training
    hold = dict(occupy=1, strict=True, raise_on_lease_renewal_failure=False)
    with ExitStack() as held:
        try:
            held.enter_context(concurrency(name, max_retries=0, **hold))  # one try: free, or held by another run
        except ConcurrencySlotAcquisitionError as exc:
            cause = getattr(exc.__cause__, "response", None)
            if getattr(cause, "status_code", None) != 423:  # not "locked": a missing limit, an unreachable server
                hint = " (run `llmops setup`)" if "must be created" in str(exc) else ""
                raise LlmopsError(f"concurrency limit {name!r}: {exc}{hint}") from None
            if params.on_busy == "skip":
                raise Busy(f"another pipeline run holds the concurrency limit {name!r} and orchestration.on_busy "
                           "is skip: nothing was built") from None
            print(f"waiting for the concurrency limit {name!r}: another pipeline run holds it")
            try:
                held.enter_context(concurrency(name, timeout_seconds=params.wait_timeout_s, **hold))
            except AcquireConcurrencySlotTimeoutError:
                raise LlmopsError(f"gave up after {params.wait_timeout_s:g} s waiting for the concurrency limit "
                                  f"{name!r} (orchestration.wait_timeout_s)") from None
        print(f"holding the concurrency limit {name!r}: no other run builds until this one ends")
        yield


def _prefect(root: Path, *args: str, env: dict[str, str]) -> str:
    proc = subprocess.run([str(Path(sys.executable).parent / "prefect"), *args], cwd=root, env=env,
                          capture_output=True, text=True)
    if proc.returncode:
        said = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
        raise SetupError(f"`prefect {' '.join(args)}` failed: {said[-1] if said else proc.returncode}")
    return proc.stdout


def _limit_exists(name: str) -> bool:
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            return False
    return True


def _form_defaults(names: list[str], params: dict) -> None:
    """Make params.yaml the deployments' default `params`, so the UI's form starts from it: a run applies only what
    the form changes (llmops/pipeline/flows/build_model.py). (`prefect deploy --all` ignores --params.)"""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import DeploymentUpdate

    with get_client(sync_client=True) as client:
        for name in names:
            deployment = client.read_deployment_by_name(name)
            if "params" not in (deployment.parameter_openapi_schema or {}).get("properties", {}):
                continue  # a flow without the params form (the monitor reads params.yaml as it is)
            client.update_deployment(deployment.id, DeploymentUpdate(
                parameters={**deployment.parameters, "params": params}))


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
    params = load_params(root / PARAMS_FILE)
    limit = params.orchestration.concurrency_limit
    if limit is not None:
        try:
            _prefect(root, "global-concurrency-limit", "inspect", limit, env=env)
        except SetupError:  # not there yet
            _prefect(root, "global-concurrency-limit", "create", limit, "--limit", "1", env=env)
        else:
            _prefect(root, "global-concurrency-limit", "update", limit, "--limit", "1", "--enable", env=env)
        done.append(f"concurrency limit {limit!r}: 1 run at a time")
    out = _prefect(root, "--no-prompt", "deploy", "--prefect-file", str(DEPLOYMENTS), "--all", env=env)
    names = [line.split("'")[1] for line in out.splitlines() if "Deployment '" in line and "successfully" in line]
    _form_defaults(names, params.model_dump(mode="json"))
    done += [f"deployment {name!r}: registered for {root}" for name in names]
    done.append(f"start a worker on this machine: prefect worker start --pool {POOL}")
    return done
