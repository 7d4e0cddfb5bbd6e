"""Human approval before production: the flow pauses with Prefect's typed input form and waits for a decision.

The reviewer answers in the Prefect UI (the paused run's Resume form) or with `llmops approve|reject RUN`;
both go through Prefect's resume API, which accepts one answer for one pause: a second answer, or an answer
to a run that is not waiting, is refused, so nothing is promoted twice.
"""

from __future__ import annotations

import asyncio
import time
from uuid import UUID

import httpx
from prefect.input import RunInput
from pydantic import Field

from llmops import identity
from llmops.errors import LlmopsError

NOBODY = "nobody"  # the reviewer of a review that timed out (a rejection nobody made)


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


def wait_for_decision(version: str, production: str | None, scores: list[str], timeout_s: float) -> Decision:
    """Pause this flow run until a reviewer answers; no answer in `timeout_s` is a rejection."""
    from prefect.artifacts import create_markdown_artifact
    from prefect.exceptions import FlowPauseTimeout
    from prefect.flow_runs import pause_flow_run
    from prefect.runtime import flow_run
    from prefect.settings import PREFECT_API_URL

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
    try:
        return pause_flow_run(wait_for_input=Decision.with_initial_data(description=description, approve=False),
                              timeout=int(timeout_s), poll_interval=3,
                              key="approve-" + version.replace(".", "-"))  # lowercase, digits, dashes only
    except FlowPauseTimeout:
        # Prefect now turns any state an expired pause moves to into Failed("... never resumed"), and its
        # pause-expiry service may get there first: take the run out of the pause so it ends as the rejection it is
        # (an answer sent from here on is refused by the server: the pause is over)
        from prefect.client.orchestration import get_client
        from prefect.settings import get_current_settings
        from prefect.states import Running

        # the service may also have read the run as paused just before we moved it, and fail it after: once its next
        # loop has passed, the run is no longer paused for it to see; make sure it is running then
        loop_s = get_current_settings().server.services.pause_expirations.loop_seconds
        with get_client(sync_client=True) as client:
            for _ in range(3):
                client.set_flow_run_state(flow_run.id, Running(message="no decision in time"), force=True)
                time.sleep(loop_s + 1)
                if client.read_flow_run(flow_run.id).state.is_running():
                    break
        return Decision(approve=False, reviewer=NOBODY,
                        reason=f"no decision within {timeout_s:g} s (deploy.approval_timeout_s)")


def answer(run: str, approve: bool, reason: str, reviewer: str | None = None) -> str:
    """Answer the paused run `run` (its name or id) through the Prefect API; returns a line saying what was done.

    Raises:
        ApprovalError: no such run, a run not waiting for approval, an answer already given, or bad input.
    """
    reviewer = reviewer or identity.current()
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
