"""/v1/explain: token-level attributions of an answer to its prompt (feature ablation; llmops.evaluation.explain)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from llmops.serving.routes.common import RuntimeDep, Text, error, not_allowed, screen
from llmops.serving.runtime import UnknownModel

router = APIRouter()


class ExplainRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    prompt: Text = Field(min_length=1, description="the user's prompt (rendered through the chat template, as chat is)")
    answer: Text | None = Field(None, min_length=1, description="the answer to explain; default: the greedy one")
    max_tokens: int = Field(16, ge=1, le=256, description="the greedy answer's length bound")


@router.post("/v1/explain")
async def explain_route(body: ExplainRequest, request: Request, runtime: RuntimeDep):
    """Token-level attributions of the answer to the prompt (feature ablation; llmops.evaluation.explain)."""
    from llmops.evaluation import explain

    if refused := await not_allowed(runtime, request.state.caller, body.model) or await screen(
            runtime, "prompt", [body.prompt]):
        return refused
    try:
        target = runtime.served.pick(body.model)
    except UnknownModel as exc:
        return error(404, str(exc), param="model", code="model_not_found")
    privacy, explainers = runtime.privacy, runtime.explainers

    def work():
        # gradients need a model of their own: the serving engine's is set up for paged, batched decoding
        engine = target.engine
        key = (str(engine.model_dir), target.adapter)
        with runtime.explainers_lock:
            if key not in explainers:
                explainers.clear()  # after a reload, the old model's copy goes
                adapter = engine.lora.dirs[target.adapter] if target.adapter else None
                explainers[key] = explain.load(key[0], adapter=adapter, tokenizer_dir=engine.tokenizer_dir)
            model, tokenizer = explainers[key]
        return explain.explain(model, tokenizer, privacy.prompt(body.prompt), answer=body.answer,
                               max_new_tokens=body.max_tokens)

    try:
        result = await asyncio.to_thread(work)
    except explain.ExplainError as exc:
        return error(400, str(exc), param="prompt",
                     code="context_length_exceeded" if "context" in str(exc) else "nothing_to_explain")
    shown = result.to_dict() | {"answer": privacy.answer(result.answer)}
    return {"object": "explanation", "model": target.label, **shown}
