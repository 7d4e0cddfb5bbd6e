"""/v1/feedback: a rating of an answer, by its response id (llmops.serving.feedback keeps it)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from llmops.serving.feedback import MAX_RATING, MIN_RATING, FeedbackError, UnknownRequest
from llmops.serving.routes.common import RuntimeDep, Text, error

router = APIRouter()


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    request_id: str = Field(min_length=1, max_length=64, description="the `id` of the response rated")
    rating: int = Field(ge=MIN_RATING, le=MAX_RATING, description="1 (bad) to 5 (good)")
    correction: Text | None = Field(None, max_length=65_536, description="the answer it should have given")
    comment: Text | None = Field(None, max_length=65_536)


@router.post("/v1/feedback")
async def rate(body: FeedbackRequest, runtime: RuntimeDep):
    try:
        # a correction becomes training data and a comment is read by people: neither keeps personal data
        feedback_id = await asyncio.to_thread(
            runtime.store.add_feedback, body.request_id, body.rating,
            *(runtime.privacy.for_log(text) if text else text for text in (body.correction, body.comment)))
    except UnknownRequest as exc:
        return error(404, str(exc), param="request_id", code="request_not_found")
    except FeedbackError as exc:
        return error(503, str(exc), kind="server_error")
    return {"id": feedback_id, "object": "feedback", "request_id": body.request_id, "rating": body.rating}
