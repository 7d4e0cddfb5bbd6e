"""/v1/models, /v1/completions and /v1/chat/completions (streamed over SSE or not), as OpenAI's API answers them.

Chat messages render through the model's chat template, the one the model was fine-tuned with (llmops/training/chat.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import Callable
from typing import Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from llmops.governance.privacy import AnswerStream
from llmops.serving.engine import EngineError, Sampling
from llmops.serving.generation import Generation, RequestLog, route_of, whole
from llmops.serving.http_server import CLIENT_CLOSED
from llmops.serving.routes.common import RuntimeDep, Text, engine_error, error, not_allowed, screen
from llmops.serving.runtime import Metrics, Runtime, UnknownModel
from llmops.training.chat import TemplateError
from llmops.training.chat import prompt_ids as chat_ids

CACHE_HEADER = "X-LLMOps-Cache"  # hit: answered from the response cache; miss: generated and kept; bypass: sampled

router = APIRouter()


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = Field(False, description="a last chunk, before [DONE], with the request's token counts")


class _Request(BaseModel):
    # fields this server does not declare are kept (model_extra): those of UNSUPPORTED are refused, the rest (metadata,
    # store, ...) change nothing of the answer
    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=1, description="one choice per request")
    stream: bool = False
    stop: Text | list[Text] | None = None
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # vLLM's extension: always generate max_tokens
    user: str | None = Field(None, max_length=256, description="the caller's end-user id; the monitor's own probes "
                             "say llmops-monitor")


# OpenAI request fields whose semantics this server does not implement, with their values that ask for nothing: any
# other value is a 400 naming the field, never a 200 that silently went without it (a caller asking for logprobs, a
# seed or a penalty must not believe it got one)
UNSUPPORTED: dict[str, tuple] = {
    "logprobs": (None, False), "top_logprobs": (None, 0), "seed": (None,), "logit_bias": (None, {}),
    "presence_penalty": (None, 0), "frequency_penalty": (None, 0), "response_format": (None, {"type": "text"}),
    "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []), "function_call": (None, "none"),
    "echo": (None, False), "best_of": (None, 1), "suffix": (None, ""),
}


class CompletionRequest(_Request):
    prompt: Text


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: Text


class ChatRequest(_Request):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


@router.get("/v1/models")
async def models(runtime: RuntimeDep):
    return {"object": "list", "data": [{"id": model, "object": "model", "created": 0, "owned_by": "llmops",
                                        "version": version} for model, version in runtime.served.models]}


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request, runtime: RuntimeDep):
    if refused := await not_allowed(runtime, request.state.caller, body.model) or await screen(
            runtime, "prompt", [body.prompt]):
        return refused
    privacy = runtime.privacy
    return await _respond(runtime, request, body,
                          lambda tok: tok(privacy.prompt(body.prompt), add_special_tokens=False)["input_ids"],
                          body.prompt, "text_completion", "prompt")


@router.post("/v1/chat/completions")
async def chat(body: ChatRequest, request: Request, runtime: RuntimeDep):
    messages = [m.model_dump() for m in body.messages]
    if refused := await not_allowed(runtime, request.state.caller, body.model) or await screen(
            runtime, "messages", [m["content"] for m in messages]):
        return refused
    if body.max_completion_tokens is not None:
        body = body.model_copy(update={"max_tokens": body.max_completion_tokens})
    privacy = runtime.privacy
    return await _respond(runtime, request, body, lambda tok: chat_ids(
        tok, [{**m, "content": privacy.prompt(m["content"])} for m in messages], "messages"),
        messages[-1]["content"], "chat.completion", "messages")


async def _respond(runtime: Runtime, request: Request, body: _Request, encode: Callable[[object], list[int]],
                   prompt: str, kind: str, what: str):
    """Generate for `body` on the model it picks; `encode(tokenizer)` gives the prompt's token ids (by that model's
    tokenizer: a canary on another base has its own)."""
    for name, value in (body.model_extra or {}).items():
        if name in UNSUPPORTED and value not in UNSUPPORTED[name]:
            return error(400, f"{name}: not supported by this server (leave it unset, or "
                         f"{UNSUPPORTED[name][-1]!r})", param=name, code="unsupported_parameter")
    if body.stream_options is not None and not body.stream:  # as OpenAI answers it
        return error(400, "stream_options: only allowed when stream is true", param="stream_options")
    try:
        target = runtime.served.pick(body.model, body.user or f"key:{request.state.caller}")
    except UnknownModel as exc:
        return error(404, str(exc), param="model", code="model_not_found")
    request.state.version = target.version
    engine = target.engine
    try:
        ids = await asyncio.to_thread(encode, engine.tokenizer)  # a 1 MiB prompt takes a while: off the event loop
    except TemplateError as exc:  # no chat template, or one that refuses these messages (e.g. roles out of order)
        return error(400, f"{exc}; a model without a chat template takes /v1/completions", param=what,
                     code="chat_template_error")
    if not ids:  # nothing to continue from (the engine cannot take an empty sequence)
        return error(400, f"the {what} is empty: give the model at least one token to continue from", param=what,
                     code="empty_prompt")
    max_tokens = body.max_tokens or max(1, min(256, engine.context - len(ids)))
    if len(ids) + max_tokens > engine.context:
        return error(400, f"This model's maximum context length is {engine.context} tokens; the {what} has "
                     f"{len(ids)} and max_tokens asks for {max_tokens} more", param=what,
                     code="context_length_exceeded")
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    sampling = Sampling(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                        ignore_eos=body.ignore_eos)
    rid = f"{'chatcmpl' if kind.startswith('chat') else 'cmpl'}-{uuid.uuid4().hex}"
    cache, metrics, privacy, log = runtime.cache, runtime.metrics, runtime.privacy, runtime.log
    key = cache.key(request.state.caller, target.label, ids, sampling, stops)
    hit = cache.get(key)
    cached = "bypass" if key is None else "hit" if hit is not None else "miss"
    metrics.cache.labels(cached).inc()
    headers = {CACHE_HEADER: cached}
    run = Generation(ids, sampling, stops, metrics, target, replay=hit,
                     keep=(lambda answer: cache.put(key, answer)) if cached == "miss" else None)
    if body.stream:
        usage = body.stream_options is not None and body.stream_options.include_usage
        return StreamingResponse(_sse(run, rid, kind, target.label, log, prompt, target.version, body.user,
                                      privacy.stream(), metrics, usage), media_type="text/event-stream",
                                 headers=headers)
    collect = asyncio.ensure_future(whole(run))
    gone = asyncio.ensure_future(_client_gone(request))
    try:
        await asyncio.wait({collect, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if not collect.done():  # the client left: its generation stops (the engine drops the request)
        collect.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await collect
        metrics.cancelled.labels(route_of(kind)).inc()
        return Response(status_code=CLIENT_CLOSED)  # logged as such by the app's guard; nobody reads it
    try:
        raw = collect.result()
    except EngineError as exc:
        return engine_error(exc)
    for found in privacy.found(raw):
        metrics.pii.labels("answer", found).inc()
    text = privacy.answer(raw)
    await log.answered(rid, kind, target.version, run, prompt, raw, body.user)
    usage = {"prompt_tokens": len(ids), "completion_tokens": run.completion_tokens,
             "total_tokens": len(ids) + run.completion_tokens}
    choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": run.finish_reason}
              if kind.startswith("chat") else
              {"index": 0, "text": text, "finish_reason": run.finish_reason, "logprobs": None})
    return JSONResponse({"id": rid, "object": kind, "created": int(time.time()), "model": target.label,
                         "choices": [choice], "usage": usage}, headers=headers)


async def _client_gone(request: Request) -> None:
    """Returns once the client has disconnected (its body was read already: the next message says it left)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _sse(run: Generation, rid: str, kind: str, model: str, log: RequestLog, prompt: str,
               version: str | None, user: str | None, stream: AnswerStream, metrics: Metrics, usage: bool = False):
    """`usage` (stream_options.include_usage): every chunk says "usage": null, and a last one before [DONE] carries
    the token counts with no choices, as OpenAI streams them."""
    chunk_kind = "chat.completion.chunk" if kind.startswith("chat") else "text_completion"
    created = int(time.time())

    def chunk(choices: list, counts: dict | None = None) -> str:
        body = {"id": rid, "object": chunk_kind, "created": created, "model": model, "choices": choices}
        return f"data: {json.dumps(body | ({'usage': counts} if usage else {}))}\n\n"

    def event(delta: str | None, finish: str | None) -> str:
        if chunk_kind == "chat.completion.chunk":
            choice = {"index": 0, "delta": {} if delta is None else {"role": "assistant", "content": delta},
                      "finish_reason": finish}
        else:
            choice = {"index": 0, "text": delta or "", "finish_reason": finish, "logprobs": None}
        return chunk([choice])

    pieces = aiter(run)
    try:
        async for piece in pieces:
            if released := stream.push(piece):
                yield event(released, None)
        if rest := stream.finish():
            yield event(rest, None)
        yield event(None, run.finish_reason)
        if usage:
            yield chunk([], {"prompt_tokens": len(run.ids), "completion_tokens": run.completion_tokens,
                             "total_tokens": len(run.ids) + run.completion_tokens})
        yield "data: [DONE]\n\n"
    except EngineError as exc:
        failed = engine_error(exc)
        yield f"data: {failed.body.decode()}\n\n"
        log.failed(route_of(kind), failed.status_code, run.latency_s)
        return
    except (asyncio.CancelledError, GeneratorExit):  # the client left: the stream was cancelled, or closed
        await pieces.aclose()  # its generation stops now, not when the garbage collector finds it
        metrics.cancelled.labels(route_of(kind)).inc()
        log.failed(route_of(kind), CLIENT_CLOSED, run.latency_s)
        raise
    for found in stream.privacy.found(stream.raw):
        metrics.pii.labels("answer", found).inc()
    await log.answered(rid, kind, version, run, prompt, stream.raw, user)
