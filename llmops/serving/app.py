"""The OpenAI-compatible HTTP server: one model, continuous batching, API keys, Prometheus metrics, request logs.

Routes: /v1/completions and /v1/chat/completions (streamed over SSE or not), /v1/models,
/v1/feedback (a rating of an answer, by its response id), /health (open: for a load balancer),
/ready, /metrics. Every route but /health needs
`Authorization: Bearer <key>`, /metrics included. Chat messages render through the model's
chat template, the one the model was fine-tuned with (llmops/training/chat.py). Bad requests get a 4xx
with an OpenAI-style error body naming the field; nothing a client sends reaches a 500.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import os
import signal
import statistics
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmops.governance import access
from llmops.governance import apikeys
from llmops.governance import audit
from llmops.serving.body_limit import MAX_BODY_BYTES, BodyLimit
from llmops.training.chat import TemplateError
from llmops.training.chat import prompt_ids as chat_ids
from llmops.serving.engine import Engine, EngineError, EngineUnavailable, Sampling
from llmops.serving.feedback import MAX_RATING, MIN_RATING, FeedbackError, Store, UnknownRequest
from llmops.serving.http_server import CLIENT_CLOSED
from llmops.governance.privacy import AnswerStream, Privacy
from llmops.serving.requestlog import Writer
from llmops.serving.cache import Answer, ResponseCache

OPEN_PATHS = ("/health",)
GENERATION_ROUTES = ("/v1/completions", "/v1/chat/completions")
RESTART_DELAY_S = 1.0  # a dead engine is restarted this long after it is seen dead (a request that kills it each time
# cannot make it spin), and /health answers 503 meanwhile
CACHE_HEADER = "X-LLMOps-Cache"  # hit: answered from the response cache; miss: generated and kept; bypass: sampled
logger = logging.getLogger("llmops.serving.app")


def _encodable(text: str) -> str:
    """JSON may carry a lone UTF-16 surrogate ("\\ud800"), which no tokenizer can encode: refused as a bad field."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"not valid Unicode text: a lone surrogate at character {exc.start}") from None
    return text


Text = Annotated[str, AfterValidator(_encodable)]  # every text field a request carries


class ExplainRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    prompt: Text = Field(min_length=1, description="the user's prompt (rendered through the chat template, as chat is)")
    answer: Text | None = Field(None, min_length=1, description="the answer to explain; default: the greedy one")
    max_tokens: int = Field(16, ge=1, le=256, description="the greedy answer's length bound")


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


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    request_id: str = Field(min_length=1, max_length=64, description="the `id` of the response rated")
    rating: int = Field(ge=MIN_RATING, le=MAX_RATING, description="1 (bad) to 5 (good)")
    correction: Text | None = Field(None, max_length=65_536, description="the answer it should have given")
    comment: Text | None = Field(None, max_length=65_536)


class _Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        # `version`: the registry version that answered (a canary's requests apart from production's); "" where none
        self.requests = Counter("llmops_requests", "HTTP requests by route, status and answering version",
                                ["route", "status", "version"], registry=self.registry)
        self.latency = Histogram("llmops_request_seconds", "request latency (to the first byte of a stream)",
                                 ["route", "version"], registry=self.registry)
        self.ttft = Histogram("llmops_time_to_first_token_seconds", "time to the first generated token", ["version"],
                              registry=self.registry)
        self.tokens = Counter("llmops_generated_tokens", "generated tokens", ["version"], registry=self.registry)
        self.running = Gauge("llmops_requests_running", "requests being generated", registry=self.registry)
        self.waiting = Gauge("llmops_requests_waiting", "requests waiting for a batch slot", registry=self.registry)
        self.batch = Histogram("llmops_batch_size", "requests in each forward pass", registry=self.registry,
                               buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.pii = Counter("llmops_pii", "requests whose prompt or answer held personal data, by kind",
                           ["where", "kind"], registry=self.registry)
        self.cache = Counter("llmops_response_cache", "generation requests by response cache result: hit, miss "
                             "(generated, then kept), bypass (sampled: never cached)", ["result"], registry=self.registry)
        self.cancelled = Counter("llmops_requests_cancelled", "generation requests whose client left before the "
                                 "answer was whole (its generation stops; a stream was counted 200 when it started)",
                                 ["route"], registry=self.registry)
        self.restarts = Counter("llmops_engine_restarts", "generation loops restarted after they died",
                                registry=self.registry)


def _error(status: int, message: str, param: str | None = None, code: str | None = None,
           kind: str = "invalid_request_error", headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status_code=status,
                        headers=headers)


def _engine_error(exc: EngineError) -> JSONResponse:
    """The answer to a request the engine did not answer. Not taken (the engine restarts, the adapter went with a
    reload): a 503 with Retry-After, safe to send again, and `llmops route` sends it to another replica. Failed inside
    the engine: a 500, never retried anywhere, since the request itself may be what killed it."""
    if isinstance(exc, EngineUnavailable):
        return _error(503, str(exc), code="engine_unavailable", kind="server_error", headers={"Retry-After": "1"})
    return _error(500, str(exc), code="generation_failed", kind="server_error")


class UnknownModel(LookupError):
    """A request names a model this server does not serve; the message says what it serves, or why not that one."""


@dataclass(frozen=True)
class Target:
    """The model a request goes to: its label in responses, its registry version, the engine answering and the
    adapter on it (None: the engine's model itself)."""

    label: str
    version: str | None
    adapter: str | None
    engine: Engine


@dataclass(frozen=True)
class Served:
    """What the server answers with now: an engine, the name clients ask for, and the registry version behind it.

    With adapters (llmops/serving/multilora.py), the engine holds a base and each version in `adapters` is a LoRA adapter
    on it, asked for as `name@version`; `name` alone is the followed version (production, by default). A canary is
    one of those adapters or, on a server of one model, the model of `canary_engine`.
    """

    engine: Engine
    name: str  # stable across reloads (the registry artifact, or the directory's name)
    version: str | None = None
    adapters: tuple[str, ...] = ()  # the versions served as adapters, newest first
    refused: dict[str, str] = field(default_factory=dict)  # versions not served here -> why
    base_id: str | None = None  # which base the engine holds, for a server of adapters (adapter_catalog)
    canary: tuple[str, float] | None = None  # (version, percent): that share of the requests for `name` goes to it
    canary_engine: Engine | None = None  # a one-model server's canary (a server of adapters has it as an adapter)

    @property
    def engines(self) -> tuple[Engine, ...]:
        return (self.engine,) if self.canary_engine is None else (self.engine, self.canary_engine)

    @property
    def label(self) -> str:
        """The exact model, as responses name it (like OpenAI's dated snapshot behind an alias)."""
        return f"{self.name}@{self.version}" if self.version else self.name

    @property
    def models(self) -> list[tuple[str, str | None]]:
        """The names a request may give, each with the version behind it."""
        canary = [self.canary[0]] if self.canary_engine is not None else []
        return [(self.name, self.version)] + [(f"{self.name}@{v}", v) for v in (*self.adapters, *canary)]

    def pick(self, model: str, who: str | None = None) -> Target:
        """The target of a request for `model` from `who` (a user or a key: a canary's share is sticky per caller;
        None: production, never the canary).

        Raises:
            UnknownModel: a model not served here.
        """
        canary = self.canary[0] if self.canary is not None else None
        if canary is not None and ((who is not None and model == self.name and _bucket(who) < self.canary[1])
                                   or model == f"{self.name}@{canary}"):
            if self.canary_engine is not None:
                return Target(f"{self.name}@{canary}", canary, None, self.canary_engine)
            return Target(f"{self.name}@{canary}", canary, canary, self.engine)
        if not self.adapters:
            if model in (self.name, self.label):
                return Target(self.label, self.version, None, self.engine)
            raise UnknownModel(f"The model {model!r} does not exist; this server has {self.name!r} ({self.label!r})")
        name, _, version = model.partition("@")
        version = version or self.version
        if name == self.name and version in self.adapters:
            return Target(f"{self.name}@{version}", version, version, self.engine)
        if name == self.name and version in self.refused:
            raise UnknownModel(f"The model {model!r} is not served here: {self.refused[version]}")
        served = ", ".join(repr(m) for m, _ in self.models)
        raise UnknownModel(f"The model {model!r} does not exist; this server has {served}")


@dataclass(frozen=True)
class CanaryLimits:
    """When a canary is dropped by itself (deploy.canary_*): against production's recent requests, once each side has
    `min_requests`."""

    min_requests: int
    max_error_rate_increase: float  # canary's share of 5xx minus production's
    max_latency_ratio: float  # canary's median latency over production's (answered requests)


class _CanaryWatch:
    """The recent requests (ok, latency) of each version, and the verdict on a canary against production."""

    def __init__(self, limits: CanaryLimits, window: int = 500):
        self.limits, self.window = limits, window
        self.recent: dict[str, deque] = {}
        self.dropping = False

    def record(self, version: str, ok: bool, latency_s: float) -> None:
        self.recent.setdefault(version, deque(maxlen=self.window)).append((ok, latency_s))

    def breach(self, production: str, canary: str) -> str | None:
        """Why the canary must go, or None."""
        prod, cand = self.recent.get(production, ()), self.recent.get(canary, ())
        if min(len(prod), len(cand)) < self.limits.min_requests:
            return None
        errors = [sum(not ok for ok, _ in side) / len(side) for side in (prod, cand)]
        if errors[1] - errors[0] > self.limits.max_error_rate_increase:
            return (f"its error rate {errors[1]:.1%} exceeds production's {errors[0]:.1%} by more than "
                    f"{self.limits.max_error_rate_increase:.1%} (deploy.canary_max_error_rate_increase)")
        medians = [statistics.median([s for ok, s in side if ok] or [0.0]) for side in (prod, cand)]
        if medians[0] > 0 and medians[1] > self.limits.max_latency_ratio * medians[0]:
            return (f"its median latency {medians[1] * 1000:.0f} ms is over x{self.limits.max_latency_ratio:g} "
                    f"production's {medians[0] * 1000:.0f} ms (deploy.canary_max_latency_ratio)")
        return None


def _bucket(who: str) -> float:
    """A caller's fixed place in [0, 100): the same caller always falls on the same side of a canary's share."""
    return int.from_bytes(hashlib.sha256(who.encode()).digest()[:8], "big") / 2**64 * 100


class Callers:
    """Who may call: the API keys (hash -> name) and, in a project, its access policy; both read again on SIGHUP.

    Outside a project (`llmops serve start --model DIR` in a directory with no params.yaml) there is no policy and no
    audit trail: any valid key may call.
    """

    def __init__(self, load_keys: Callable[[], dict[str, str]], root: Path | None) -> None:
        self.load_keys, self.root = load_keys, root
        self.refresh()

    def refresh(self) -> None:
        """Read the keys and the policy again (revoked keys stop working); a bad policy raises, keeping the old."""
        keys, policy = self.load_keys(), access.load(self.root) if self.root is not None else None
        self.keys, self.policy = keys, policy

    def identify(self, header: str) -> str | None:
        """The name of the key in `Authorization: Bearer <key>`, or None."""
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            return None
        digest = apikeys.hash_key(key.strip())
        found = None
        # every stored hash is compared, each in constant time: neither the match nor its position leaks by timing
        for stored, name in self.keys.items():
            if hmac.compare_digest(digest, stored):
                found = name
        return found

    def refusal(self, name: str, model: str) -> str | None:
        """Why key `name` may not call `model`, or None if it may."""
        if self.policy is None:
            return None
        try:
            self.policy.require(f"key:{name}", "call", f"model:{model}")
        except access.AccessDenied as exc:
            return str(exc)
        return None

    def record_refusal(self, name: str, model: str, why: str) -> None:
        try:
            audit.append(self.root, "serve.call", f"model:{model}", None, "denied", {"error": why}, who=f"key:{name}")
        except audit.AuditError as exc:  # the caller is refused all the same; the operator sees why it is unrecorded
            logger.error("a refused call could not be audited: %s", exc)


def create_app(served: Served, callers: Callers, log_dir: str | os.PathLike, store: Store,
               reload: Callable[[Served], Served] | None = None,
               on_change: Callable[[Served, str | None], None] | None = None,
               privacy: Privacy = Privacy(), watch: tuple[float, Callable[[], object]] | None = None,
               cache: ResponseCache | None = None,
               canary: tuple[CanaryLimits, Callable[[str, str], None]] | None = None) -> FastAPI:
    """The app answering with `served`; requests are logged as JSON lines under `log_dir` (see requestlog) and
    recorded in `store`, which keeps the feedback on them.

    With `reload`, SIGHUP loads what it returns (given what serves now) and swaps to it: new
    requests go to the new model at once, requests in flight finish on the old one, which then
    stops; where it returns the same engine, only the adapters changed (one no longer served is
    unloaded once its requests are done). A reload that fails keeps the old model serving.
    `on_change(served, error)` hears of the start and of each reload (the error of one that
    failed). With `watch = (seconds, look)`, the server reloads by itself whenever `look()`
    returns something new (the registry's versions and stages, for a server of adapters). With
    `canary = (limits, drop)`, a canary whose requests fare worse than production's by the limits is
    dropped: `drop(version, reason)` takes its stage (registry.drop), then the server reloads without it.
    """
    metrics = _Metrics()
    cache = cache or ResponseCache(0, 1)
    watch_canary = _CanaryWatch(canary[0]) if canary is not None else None
    background: set[asyncio.Task] = set()  # tasks started from a request, kept until done
    log = _RequestLog(Writer(log_dir), store, privacy)
    current = [served]  # the one mutable cell: handlers read current[0] once, when a request arrives
    retiring: set[Engine] = set()
    closing: list[bool] = []  # becomes true once, when the server shuts down
    reloading = asyncio.Lock()
    notify = on_change or (lambda served, error: None)

    async def swap() -> None:
        async with reloading:  # signals that come while a reload runs wait for it
            cache.clear()  # whatever the reload gives: `llmops erase` reloads every server to drop cached answers
            try:
                await asyncio.to_thread(callers.refresh)  # revoked keys and a changed policy take effect now
                new = await asyncio.to_thread(reload, current[0])
                if closing:  # the server is shutting down: a started engine's thread would keep the process alive
                    return
                for engine in new.engines:
                    if engine not in current[0].engines:
                        engine.on_step = metrics.batch.observe
                        engine.start()
            except Exception as exc:  # whatever failed, the model that serves now keeps serving
                logger.error("reload failed, still serving %s: %s", current[0].label, exc)
                notify(current[0], f"{type(exc).__name__}: {exc}")
                return
            old, current[0] = current[0], new
            if new != old:
                logger.warning("reloaded: %s -> %s (adapters: %s; canary: %s)", old.label, new.label,
                               ", ".join(new.adapters), new.canary and new.canary[0])
            notify(new, None)
            if new.engine is old.engine:  # the same base: adapters no longer served go once their requests are done
                for gone in set(old.adapters) - set(new.adapters):
                    await new.engine.remove_adapter(gone)
            gone = [engine for engine in old.engines if engine not in new.engines]
            retiring.update(gone)
        for engine in gone:  # requests in flight finish on the engine they started on, which then stops
            await engine.drain()
            await asyncio.to_thread(engine.stop)
            retiring.discard(engine)

    def _judge_canary(version: str) -> None:
        """After a canary's request: drop it (in the background, the response is not held) if it fares worse."""
        now = current[0]
        if now.canary is None or version != now.canary[0] or watch_canary.dropping:
            return
        reason = watch_canary.breach(now.version, version)
        if reason is not None:
            watch_canary.dropping = True  # one drop at a time
            background.add(task := asyncio.ensure_future(_drop_canary(version, reason)))
            task.add_done_callback(background.discard)

    async def _drop_canary(version: str, reason: str) -> None:
        logger.error("dropping canary %s: %s", version, reason)
        try:
            await asyncio.to_thread(canary[1], version, reason)
        except Exception as exc:  # the registry refused (policy, remote): it keeps serving; look again later
            logger.error("could not drop canary %s: %s", version, exc)
        else:
            await swap()
        finally:
            watch_canary.dropping = False

    async def _watch() -> None:
        seconds, look = watch
        seen = None
        while True:
            try:
                now = await asyncio.to_thread(look)
            except Exception as exc:  # e.g. the registry remote is unreachable for a moment: look again later
                logger.error("could not look for registry changes: %s", exc)
            else:
                if seen is not None and now != seen:
                    await swap()
                seen = now
            await asyncio.sleep(seconds)

    async def _supervise() -> None:
        """Restart a serving engine whose generation loop died (a request that made the sampler fail killed it for
        every later one): the requests it held failed with a 500, /health answers 503 until it runs again."""
        while True:
            await asyncio.sleep(0.2)
            for engine in current[0].engines:
                if closing or (failure := engine.failure) is None:
                    continue
                logger.error("the generation engine of %s died (%s: %s); restarting it in %g s", engine.model_dir,
                             type(failure).__name__, failure, RESTART_DELAY_S)
                await asyncio.sleep(RESTART_DELAY_S)
                if not closing and engine in current[0].engines:  # not swapped out meanwhile
                    engine.restart()
                    metrics.restarts.inc()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        for engine in current[0].engines:
            engine.on_step = metrics.batch.observe
            engine.start()
        if reload is not None:
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(swap()))
        notify(current[0], None)
        watcher = asyncio.ensure_future(_watch()) if watch is not None and reload is not None else None
        supervisor = asyncio.ensure_future(_supervise())
        try:
            yield
        finally:
            closing.append(True)
            if watcher is not None:
                watcher.cancel()
            for engine in (*current[0].engines, *retiring):
                engine.stop()  # after uvicorn finished the requests in flight
            supervisor.cancel()

    app = FastAPI(title="llmops", lifespan=lifespan)
    paths: set[str] = set()  # the app's routes (below, and FastAPI's own), once they are all declared

    def labelled(path: str) -> str:
        """A /metrics label from a fixed set: the route, or "other". The raw path of every probe (20,000 of them, an
        email in one) grew /metrics to 36 MB, and one scrape took 22 s on the event loop."""
        if not paths:
            paths.update(r.path for r in app.routes)
        return path if path in paths else "other"

    @app.middleware("http")
    async def guard(request: Request, call_next):
        started = time.perf_counter()
        route = request.url.path
        request.state.caller = callers.identify(request.headers.get("authorization", ""))
        if route not in OPEN_PATHS and request.state.caller is None:
            response = _error(401, "Incorrect API key provided: send `Authorization: Bearer <key>`",
                              code="invalid_api_key")
        else:
            response = await call_next(request)
        elapsed = time.perf_counter() - started
        version = getattr(request.state, "version", None) or ""  # set by a generation route once it picked
        label = labelled(route)
        metrics.requests.labels(label, str(response.status_code), version).inc()
        metrics.latency.labels(label, version).observe(elapsed)
        if route in GENERATION_ROUTES and version and watch_canary is not None:
            watch_canary.record(version, response.status_code < 500, elapsed)
            _judge_canary(version)
        if route in GENERATION_ROUTES and response.status_code >= 400:  # answered ones are logged with their text
            log.failed(route, response.status_code, elapsed)
        return response

    app.add_middleware(BodyLimit, max_bytes=MAX_BODY_BYTES)  # outermost: before authentication reads anything

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0]
        if first.get("type") == "json_invalid":
            return _error(400, "the body is not valid JSON")
        param = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
        if param is None:
            return _error(400, "the body must be a JSON object (Content-Type: application/json)")
        return _error(400, f"{param}: {first.get('msg')}", param=param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return _error(exc.status_code, str(exc.detail))

    @app.get("/health")
    async def health():
        # open, for load balancers and `llmops route`: what this replica runs on, and how busy it is; a 503 while an
        # engine is down (a liveness probe acts on it; the server restarts the engine by itself first)
        now = current[0]
        up = all(engine.healthy for engine in now.engines)
        return JSONResponse({"status": "ok" if up else "engine down", "ready": up, "model": now.name,
                             "version": now.version, **now.engine.describe()}, status_code=200 if up else 503)

    @app.get("/ready")
    async def ready():
        now = current[0]
        if not now.engine.healthy:
            return _error(503, "the generation engine is not running", kind="server_error")
        return {"status": "ready", "model": now.name, "version": now.version}

    @app.get("/metrics")
    async def metrics_page():
        stats = current[0].engine.stats()
        metrics.running.set(stats.running)
        metrics.waiting.set(stats.waiting)
        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model, "object": "model", "created": 0, "owned_by": "llmops",
                                            "version": version} for model, version in current[0].models]}

    @app.post("/v1/feedback")
    async def rate(body: FeedbackRequest):
        try:
            # a correction becomes training data and a comment is read by people: neither keeps personal data
            feedback_id = await asyncio.to_thread(
                store.add_feedback, body.request_id, body.rating,
                *(privacy.for_log(text) if text else text for text in (body.correction, body.comment)))
        except UnknownRequest as exc:
            return _error(404, str(exc), param="request_id", code="request_not_found")
        except FeedbackError as exc:
            return _error(503, str(exc), kind="server_error")
        return {"id": feedback_id, "object": "feedback", "request_id": body.request_id, "rating": body.rating}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        if refused := await _refused(request.state.caller, body.model) or await _screen("prompt", [body.prompt]):
            return refused
        return await _respond(current[0], request, body,
                              lambda tok: tok(privacy.prompt(body.prompt), add_special_tokens=False)["input_ids"],
                              body.prompt, "text_completion", "prompt")

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        messages = [m.model_dump() for m in body.messages]
        if refused := await _refused(request.state.caller, body.model) or await _screen(
                "messages", [m["content"] for m in messages]):
            return refused
        if body.max_completion_tokens is not None:
            body = body.model_copy(update={"max_tokens": body.max_completion_tokens})
        return await _respond(current[0], request, body, lambda tok: chat_ids(
            tok, [{**m, "content": privacy.prompt(m["content"])} for m in messages], "messages"),
            messages[-1]["content"], "chat.completion", "messages")

    async def _screen(what: str, texts: list[str]) -> JSONResponse | None:
        """Count the personal data in a prompt; a 400 if this deployment refuses it. Off the event loop, as the
        masking in `_respond`'s encode is: the patterns take ~0.3 s over a 1 MiB prompt."""
        found = await asyncio.to_thread(lambda: sorted({kind for text in texts for kind in privacy.found(text)}))
        for kind in found:
            metrics.pii.labels("prompt", kind).inc()
        if found and privacy.mode == "refuse":
            return _error(400, f"the {what} hold personal data ({', '.join(found)}); this deployment refuses it "
                          "(deploy.privacy: refuse)", param=what, code="pii_in_prompt")
        return None

    explainers: dict[tuple, tuple] = {}  # the served model's directory -> a copy of it for explanations (see below)
    # one load at a time: concurrent first calls each loading the copy broke transformers' loading ("Cannot copy out of
    # meta tensor"), every one a 500
    explainers_lock = threading.Lock()

    @app.post("/v1/explain")
    async def explain_route(body: ExplainRequest, request: Request):
        """Token-level attributions of the answer to the prompt (feature ablation; llmops.evaluation.explain)."""
        from llmops.evaluation import explain

        if refused := await _refused(request.state.caller, body.model) or await _screen("prompt", [body.prompt]):
            return refused
        now = current[0]
        try:
            target = now.pick(body.model)
        except UnknownModel as exc:
            return _error(404, str(exc), param="model", code="model_not_found")

        def work():
            # gradients need a model of their own: the serving engine's is set up for paged, batched decoding
            engine = target.engine
            key = (str(engine.model_dir), target.adapter)
            with explainers_lock:
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
            return _error(400, str(exc), param="prompt",
                          code="context_length_exceeded" if "context" in str(exc) else "nothing_to_explain")
        shown = result.to_dict() | {"answer": privacy.answer(result.answer)}
        return {"object": "explanation", "model": target.label, **shown}

    async def _refused(caller: str, model: str) -> JSONResponse | None:
        """A 403 when the policy does not let this key call `model` (recorded in the audit trail), else None."""
        why = callers.refusal(caller, model)
        if why is None:
            return None
        await asyncio.to_thread(callers.record_refusal, caller, model, why)
        return _error(403, why, param="model", code="model_not_allowed", kind="permission_error")

    async def _respond(now: Served, request: Request, body: _Request, encode: Callable[[object], list[int]],
                       prompt: str, kind: str, what: str):
        """Generate for `body` on the model it picks; `encode(tokenizer)` gives the prompt's token ids (by that
        model's tokenizer: a canary on another base has its own)."""
        for name, value in (body.model_extra or {}).items():
            if name in UNSUPPORTED and value not in UNSUPPORTED[name]:
                return _error(400, f"{name}: not supported by this server (leave it unset, or "
                              f"{UNSUPPORTED[name][-1]!r})", param=name, code="unsupported_parameter")
        if body.stream_options is not None and not body.stream:  # as OpenAI answers it
            return _error(400, "stream_options: only allowed when stream is true", param="stream_options")
        try:
            target = now.pick(body.model, body.user or f"key:{request.state.caller}")
        except UnknownModel as exc:
            return _error(404, str(exc), param="model", code="model_not_found")
        request.state.version = target.version
        engine = target.engine
        try:
            ids = await asyncio.to_thread(encode, engine.tokenizer)  # a 1 MiB prompt takes a while: off the event loop
        except TemplateError as exc:  # no chat template, or one that refuses these messages (e.g. roles out of order)
            return _error(400, f"{exc}; a model without a chat template takes /v1/completions", param=what,
                          code="chat_template_error")
        if not ids:  # nothing to continue from (the engine cannot take an empty sequence)
            return _error(400, f"the {what} is empty: give the model at least one token to continue from", param=what,
                          code="empty_prompt")
        max_tokens = body.max_tokens or max(1, min(256, engine.context - len(ids)))
        if len(ids) + max_tokens > engine.context:
            return _error(400, f"This model's maximum context length is {engine.context} tokens; the {what} has "
                          f"{len(ids)} and max_tokens asks for {max_tokens} more", param=what,
                          code="context_length_exceeded")
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        sampling = Sampling(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                            ignore_eos=body.ignore_eos)
        rid = f"{'chatcmpl' if kind.startswith('chat') else 'cmpl'}-{uuid.uuid4().hex}"
        key = cache.key(request.state.caller, target.label, ids, sampling, stops)
        hit = cache.get(key)
        cached = "bypass" if key is None else "hit" if hit is not None else "miss"
        metrics.cache.labels(cached).inc()
        headers = {CACHE_HEADER: cached}
        run = _Generation(ids, sampling, stops, metrics, target, replay=hit,
                          keep=(lambda answer: cache.put(key, answer)) if cached == "miss" else None)
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(_sse(run, rid, kind, target.label, log, prompt, target.version, body.user,
                                          privacy.stream(), metrics, usage), media_type="text/event-stream",
                                     headers=headers)
        collect = asyncio.ensure_future(_whole(run))
        gone = asyncio.ensure_future(_client_gone(request))
        try:
            await asyncio.wait({collect, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if not collect.done():  # the client left: its generation stops (the engine drops the request)
            collect.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await collect
            metrics.cancelled.labels(_route(kind)).inc()
            return Response(status_code=CLIENT_CLOSED)  # logged as such by `guard`; nobody reads it
        try:
            raw = collect.result()
        except EngineError as exc:
            return _engine_error(exc)
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

    return app


def _stop_prefix(text: str, stops: list[str]) -> int:
    """The length of the longest end of `text` that begins a stop string (0: none): it may be the stop's start."""
    return max((k for stop in stops for k in range(min(len(stop) - 1, len(text)), 0, -1)
                if text.endswith(stop[:k])), default=0)


async def _whole(run: _Generation) -> str:
    return "".join([piece async for piece in run])


async def _client_gone(request: Request) -> None:
    """Returns once the client has disconnected (its body was read already: the next message says it left)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class _Generation:
    """One request's text as it is generated: decoded incrementally, cut at a stop string, with its timings.

    With `replay`, the text is a cached answer's (no forward pass); with `keep`, a complete answer is handed to it
    (for the response cache)."""

    def __init__(self, ids: list[int], sampling: Sampling, stops: list[str], metrics: _Metrics, target: Target,
                 replay: Answer | None = None, keep: Callable[[Answer], None] | None = None):
        self.ids, self.sampling, self.stops, self.metrics = ids, sampling, stops, metrics
        self.engine, self.adapter, self.version = target.engine, target.adapter, target.version
        self.replay, self.keep = replay, keep
        self.completion_tokens = 0
        self.finish_reason = "length"
        self.started = time.perf_counter()
        self.latency_s = 0.0

    async def __aiter__(self) -> AsyncIterator[str]:
        if self.replay is not None:
            self.finish_reason, self.completion_tokens = self.replay.finish_reason, self.replay.completion_tokens
            self.latency_s = time.perf_counter() - self.started
            if self.replay.text:
                yield self.replay.text
            return
        tok = self.engine.tokenizer
        tokens: list[int] = []
        sent = text = ""
        try:
            async for new in self.engine.generate(self.ids, self.sampling, self.adapter):
                if not tokens:
                    self.metrics.ttft.labels(self.version or "").observe(time.perf_counter() - self.started)
                tokens += new
                self.completion_tokens = len(tokens)
                self.metrics.tokens.labels(self.version or "").inc(len(new))
                if tok.eos_token_id in new and not self.sampling.ignore_eos:
                    self.finish_reason = "stop"
                text = tok.decode(tokens, skip_special_tokens=True)
                cut = min((text.find(s) for s in self.stops if s and s in text), default=-1)
                if cut >= 0:
                    text, self.finish_reason = text[:cut], "stop"
                # what could still become a stop string waits (vLLM does the same): "20 year" is not sent before
                # the next token shows whether it is "20 years" with stop="years"
                ready = len(text) if cut >= 0 else len(text) - _stop_prefix(text, self.stops)
                if ready > len(sent) and text.startswith(sent):
                    yield text[len(sent):ready]
                    sent = text[:ready]
                if cut >= 0:
                    break  # leaving the engine's iterator cancels the request
            else:  # the answer ended without a stop string: what was held back goes out
                if len(text) > len(sent) and text.startswith(sent):
                    yield text[len(sent):]
                    sent = text
            if self.keep is not None:  # a whole answer (an error or a client that left never gets here)
                self.keep(Answer(sent, self.finish_reason, self.completion_tokens))
        finally:
            self.latency_s = time.perf_counter() - self.started


async def _sse(run: _Generation, rid: str, kind: str, model: str, log: _RequestLog, prompt: str,
               version: str | None, user: str | None, screen: AnswerStream, metrics: _Metrics, usage: bool = False):
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
            if released := screen.push(piece):
                yield event(released, None)
        if rest := screen.finish():
            yield event(rest, None)
        yield event(None, run.finish_reason)
        if usage:
            yield chunk([], {"prompt_tokens": len(run.ids), "completion_tokens": run.completion_tokens,
                             "total_tokens": len(run.ids) + run.completion_tokens})
        yield "data: [DONE]\n\n"
    except EngineError as exc:
        failed = _engine_error(exc)
        yield f"data: {failed.body.decode()}\n\n"
        log.failed(_route(kind), failed.status_code, run.latency_s)
        return
    except (asyncio.CancelledError, GeneratorExit):  # the client left: the stream was cancelled, or closed
        await pieces.aclose()  # its generation stops now, not when the garbage collector finds it
        metrics.cancelled.labels(_route(kind)).inc()
        log.failed(_route(kind), CLIENT_CLOSED, run.latency_s)
        raise
    for found in screen.privacy.found(screen.raw):
        metrics.pii.labels("answer", found).inc()
    await log.answered(rid, kind, version, run, prompt, screen.raw, user)


def _route(kind: str) -> str:
    return "/v1/chat/completions" if kind.startswith("chat") else "/v1/completions"


class _RequestLog:
    """Every request to a generation route, as a JSON line (see requestlog): the monitor reads these. Answered ones
    carry their prompt and answer with PII masked, and go into the feedback store too, so feedback can name them."""

    def __init__(self, writer: Writer, store: Store, privacy: Privacy):
        self.writer, self.store, self.privacy = writer, store, privacy

    async def answered(self, rid: str, kind: str, version: str | None, run: _Generation, prompt: str, answer: str,
                       user: str | None) -> None:
        from datetime import datetime, timezone

        mask = self.privacy.for_log
        prompt, answer, user = await asyncio.to_thread(lambda: (mask(prompt), mask(answer), user and mask(user)))
        self._write({
            "request_id": rid, "route": _route(kind), "model_version": version, "status": 200,
            "latency_ms": round(run.latency_s * 1000, 2), "prompt_tokens": len(run.ids),
            "completion_tokens": run.completion_tokens, "finish_reason": run.finish_reason,
            "user": user or None, "prompt": prompt, "answer": answer})
        try:
            await asyncio.to_thread(self.store.record_request, rid, datetime.now(timezone.utc), version, prompt, answer)
        except Exception as exc:  # the answer was given and logged; only feedback on it will be refused
            logger.error("could not record %s in the feedback database: %s", rid, exc)

    def failed(self, route: str, status: int, latency_s: float) -> None:
        self._write({"request_id": None, "route": route, "status": status, "latency_ms": round(latency_s * 1000, 2)})

    def _write(self, record: dict) -> None:
        try:
            self.writer.write(record)
        except OSError as exc:  # a full disk loses a log line, never the answer
            logger.error("could not write the request log: %s", exc)
