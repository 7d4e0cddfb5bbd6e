"""What the routes share: OpenAI's error body, the runtime of the app a request came to, and the checks a prompt
passes before a model sees it (the access policy, personal data)."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import Depends, Request
from fastapi.responses import JSONResponse
from pydantic import AfterValidator

from llmops.serving.engine import EngineError, EngineUnavailable
from llmops.serving.runtime import Runtime


def _encodable(text: str) -> str:
    """JSON may carry a lone UTF-16 surrogate ("\\ud800"), which no tokenizer can encode: refused as a bad field."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"not valid Unicode text: a lone surrogate at character {exc.start}") from None
    return text


Text = Annotated[str, AfterValidator(_encodable)]  # every text field a request carries


async def _runtime(request: Request) -> Runtime:
    # async: FastAPI runs a plain function's dependency in its thread pool, a thread hop per request for nothing
    return request.app.state.runtime


RuntimeDep = Annotated[Runtime, Depends(_runtime)]


def error(status: int, message: str, param: str | None = None, code: str | None = None,
          kind: str = "invalid_request_error", headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status_code=status,
                        headers=headers)


def engine_error(exc: EngineError) -> JSONResponse:
    """The answer to a request the engine did not answer. Not taken (the engine restarts, the adapter went with a
    reload): a 503 with Retry-After, safe to send again, and `llmops route` sends it to another replica. Failed inside
    the engine: a 500, never retried anywhere, since the request itself may be what killed it."""
    if isinstance(exc, EngineUnavailable):
        return error(503, str(exc), code="engine_unavailable", kind="server_error", headers={"Retry-After": "1"})
    return error(500, str(exc), code="generation_failed", kind="server_error")


async def not_allowed(runtime: Runtime, caller: str, model: str) -> JSONResponse | None:
    """A 403 when the policy does not let this key call `model` (recorded in the audit trail), else None."""
    why = runtime.callers.refusal(caller, model)
    if why is None:
        return None
    await asyncio.to_thread(runtime.callers.record_refusal, caller, model, why)
    return error(403, why, param="model", code="model_not_allowed", kind="permission_error")


async def screen(runtime: Runtime, what: str, texts: list[str]) -> JSONResponse | None:
    """Count the personal data in a prompt; a 400 if this deployment refuses it. Off the event loop, as the masking
    of a prompt is: the patterns take ~0.3 s over a 1 MiB prompt."""
    privacy = runtime.privacy
    found = await asyncio.to_thread(lambda: sorted({kind for text in texts for kind in privacy.found(text)}))
    for kind in found:
        runtime.metrics.pii.labels("prompt", kind).inc()
    if found and privacy.mode == "refuse":
        return error(400, f"the {what} hold personal data ({', '.join(found)}); this deployment refuses it "
                     "(deploy.privacy: refuse)", param=what, code="pii_in_prompt")
    return None
