"""Human approval before production: the flow pauses with Prefect's typed input form and waits for a decision.

The reviewer answers in the Prefect UI (the paused run's Resume form) or with `llmops approve|reject RUN`;
both go through Prefect's resume API, which accepts one answer for one pause: a second answer, or an answer
to a run that is not waiting, is refused, so nothing is promoted twice.
"""

from __future__ import annotations

import asyncio
import threading
from uuid import UUID

import httpx
from prefect.input import RunInput
from pydantic import Field

from llmops.core.errors import LlmopsError
from llmops.governance import identity

NOBODY = "nobody"  # the reviewer of a review that timed out (a rejection nobody made)
GRACE_S = 60


class Decision(RunInput):
    """The reviewer's answer: approve (promote to production) or reject (the run ends), with the reason."""

    approve: bool = Field(False, description="on: promote this version to production; off: reject it")
    reason: str = Field(min_length=1, description="why; kept in the run and in the registry's history")
    # Prefect's open-source API has no login: the name here is as trustworthy as access to that API (the access
    # policy checks that it names an approver; `llmops approve` checks the person running it)
    reviewer: str = Field(min_length=1, description="who decides")


class Rejected(LlmopsError):
    """The reviewer rejected the release, or nobody decided in time; nothing was promoted."""


class ApprovalError(LlmopsError):
    """An answer the paused run cannot take (not paused, already answered, unknown run); nothing changed."""


def wait_for_decision(version: str, production: str | None, scores: list[str], timeout_s: float) -> Decision | None:
    """Pause this flow run until a reviewer answers; None when nobody answered in `timeout_s` (a rejection).

    The timeout is ours, not Prefect's: at `timeout_s` the run resumes itself with a rejection through the same
    resume API a reviewer uses, so one answer wins and the pause never expires on the server (Prefect's expiry
    service fails an expired pause, racing the run for its final state). Prefect's own timeout, later by
    GRACE_S, only ends a pause whose self-resume could not be sent.
    """
    from prefect.artifacts import create_markdown_artifact
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.responses import SetStateStatus
    from prefect.exceptions import FlowPauseTimeout
    from prefect.flow_runs import pause_flow_run
    from prefect.runtime import flow_run
    from prefect.settings import PREFECT_API_URL
    from prefect.states import Running

    replaces = f"replacing {production}" if production else "the first version in production"
    description = "\n".join([
        f"### Promote {version} to production ({replaces})?", "",
        "What the run measured (the run's artifacts have the full tables: evaluate, audit-bias, quantize, gate):", "",
        *(f"    {line}" for text in scores for line in text.splitlines()), "",
        "Approve to promote it; leave *approve* off to reject it. Either way, give a reason.",
    ])
    create_markdown_artifact(key="review", markdown=description)
    api = f"PREFECT_API_URL={PREFECT_API_URL.value()}"  # `llmops run`'s own server is reachable on this machine only
    print(f"waiting up to {timeout_s:g} s for a reviewer: approve or reject in the Prefect UI (Resume), or "
          f"`{api} llmops approve {flow_run.name} --reason ...` (or `llmops reject`)")
    run_id = flow_run.id
    timed_out = threading.Event()

    def time_out() -> None:
        nobody = Decision(approve=False, reviewer=NOBODY, reason=f"no decision within {timeout_s:g} s")
        try:
            with get_client(sync_client=True) as client:
                if client.resume_flow_run(run_id, run_input=nobody.model_dump(mode="json")).status \
                        == SetStateStatus.ACCEPT:  # else a reviewer's answer got there first
                    timed_out.set()
        except httpx.HTTPError:  # Prefect's own timeout ends the pause
            pass

    timer = threading.Timer(timeout_s, time_out)
    timer.daemon = True
    timer.start()
    try:
        decision = pause_flow_run(wait_for_input=Decision.with_initial_data(description=description, approve=False),
                                  timeout=int(timeout_s) + GRACE_S, poll_interval=3,
                                  key="approve-" + version.replace(".", "-"))  # lowercase, digits, dashes only
    except FlowPauseTimeout:
        # the self-resume never got through; the expiry service may fail the run any moment: take it out of the
        # pause so that it ends as the rejection it is
        with get_client(sync_client=True) as client:
            client.set_flow_run_state(run_id, Running(message="no decision in time"), force=True)
        return None
    finally:
        timer.cancel()
        timer.join()
    return None if timed_out.is_set() else decision


def answer(run: str, approve: bool, reason: str, reviewer: str | None = None) -> str:
    """Answer the paused run `run` (its name or id) through the Prefect API; returns a line saying what was done.

    Raises:
        ApprovalError: no such run, a run not waiting for approval, an answer already given, or bad input.
    """
    reviewer = identity.check_named(".", reviewer)
    decision = Decision(approve=approve, reason=reason, reviewer=reviewer)  # bad input fails here, not on the server
    try:
        return asyncio.run(_answer(run, decision))
    except httpx.HTTPError as exc:
        raise ApprovalError(f"the Prefect server at PREFECT_API_URL cannot be reached ({exc}); nothing was changed") \
            from None


async def _answer(run: str, decision: Decision) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName
    from prefect.client.schemas.responses import SetStateStatus
    from prefect.exceptions import ObjectNotFound

    async with get_client() as client:
        try:
            found = [await client.read_flow_run(UUID(run))]
        except (ValueError, ObjectNotFound):
            found = await client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[run])))
        if len(found) != 1:
            raise ApprovalError(f"flow run {run!r}: {'no such run' if not found else 'more than one run has that name'}"
                                " on the Prefect server at PREFECT_API_URL")
        flow_run = found[0]
        state = flow_run.state
        if state is None or not state.is_paused() or state.state_details.run_input_keyset is None:
            now = state.name if state else "not started"
            raise ApprovalError(f"flow run {flow_run.name!r} is not waiting for approval (it is {now}); "
                                "nothing was changed")
        result = await client.resume_flow_run(flow_run.id, run_input=decision.model_dump(mode="json"))
        if result.status != SetStateStatus.ACCEPT:  # another answer got there first, or the pause timed out
            why = getattr(result.details, "reason", None) or result.status.value
            raise ApprovalError(f"flow run {flow_run.name!r} did not take the answer: {why}; nothing was changed")
    verdict = "approved" if decision.approve else "rejected"
    return f"flow run {flow_run.name!r}: {verdict} by {decision.reviewer} ({decision.reason})"
