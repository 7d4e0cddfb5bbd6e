"""`llmops route`: one OpenAI-compatible endpoint in front of several servers (replicas), each request sent by policy.

Each replica is an `llmops serve` whose open /health says what it runs on (hardware, variant,
context, concurrency); params.yaml's `route` section gives each replica a class, says what each
class must be, and which classes each kind of request tries in order. A replica that does not
report what its class declares is not used (one clear log line). A request goes to the first
class in its list with a healthy replica that fits it (its prompt and max_tokens within the
replica's context) and has room (fewer of our requests in flight than its concurrency), the least
loaded one within the class; when every class is full, to the least loaded of them all.
Latency-sensitive requests (streamed, or `X-LLMOps-Priority: latency`) use `policy.latency`.

Failures: /health is read every `health_interval_s`; a replica that does not answer, or whose
connection fails under a request, is out at once, until /health answers again. A request that
never reached its replica is sent to another; so is a generation whose replica failed before
answering, or answered 503 (its engine did not take it: the same request again is safe), up to
`retries` times. A 500 is not sent again: the request failed inside the engine and may be what
killed it (one poisoned request must not take every replica down). A request no replica could
take gets a 503 naming each replica and why: nothing is dropped silently.

The API keys are the servers' (the router checks them too, and passes the header on). SIGHUP reads
params.yaml and the keys again; a bad `route` section is refused and the old one keeps routing.

Our own code, small: no maintained library routes by a replica's hardware class and context with
health checks (LiteLLM's Router chooses among model deployments by usage or latency and knows
neither, and brings a proxy server of its own); httpx does the HTTP and prometheus_client the metrics.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.requests import ClientDisconnect

from llmops.core.config import Replica, RouteParams
from llmops.serving.body_limit import MAX_BODY_BYTES, BodyLimit
from llmops.serving.http_server import CLIENT_CLOSED

PRIORITY_HEADER = "X-LLMOps-Priority"  # latency: a latency-sensitive request (route.policy.latency)
REPLICA_HEADER = "X-LLMOps-Replica"  # on every routed answer: the replica that gave it
RETRIED_ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/explain")  # no side effect: safe to send again
_HOP_HEADERS = {"host", "content-length", "connection", "keep-alive", "transfer-encoding", "te", "upgrade",
                "content-encoding"}
logger = logging.getLogger("llmops.serving.router")


@dataclass
class ReplicaState:
    """A replica as the router sees it: its declaration, what it last reported, and our requests on it."""

    spec: Replica
    hardware: str  # what its class declares
    variant: str | None
    up: bool = False
    why: str = "not checked yet"  # why it is down, or not used although it answers
    info: dict[str, Any] = field(default_factory=dict)  # its last /health
    in_flight: int = 0

    @property
    def label(self) -> str:
        return self.spec.label

    @property
    def capacity(self) -> int:
        return max(1, int(self.info.get("max_concurrency") or 1))

    @property
    def context(self) -> int:
        return int(self.info.get("context") or 0)

    def mismatch(self, info: dict[str, Any]) -> str | None:
        """Why `info` (its /health) is not what the replica's class declares, or None."""
        if info.get("hardware") != self.hardware:
            return (f"class {self.spec.class_!r} declares {self.hardware}, but the replica runs on "
                    f"{info.get('hardware') or 'an unreported device'} ({info.get('device_name', '?')})")
        if self.variant is not None and info.get("variant") != self.variant:
            return f"class {self.spec.class_!r} declares variant {self.variant}, but the replica serves " \
                   f"{info.get('variant') or 'an unreported one'}"
        return None

    def describe(self) -> dict[str, Any]:
        return {"name": self.label, "url": self.spec.url, "class": self.spec.class_, "up": self.up,
                "why": None if self.up else self.why, "in_flight": self.in_flight,
                **{k: self.info.get(k) for k in ("hardware", "device_name", "variant", "context", "max_concurrency")}}


class NoReplica(Exception):
    """No replica can take the request: `status` 503 (none healthy) or 400 (none whose context fits)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def choose(replicas: list[ReplicaState], classes: list[str], need_tokens: int,
           tried: frozenset[str] = frozenset()) -> ReplicaState:
    """The replica for a request needing `need_tokens` of context, by the classes in order (see the module's doc).

    Raises:
        NoReplica: none of these classes has a healthy replica not yet tried, or none whose context fits.
    """
    healthy = [r for r in replicas if r.spec.class_ in classes and r.up and r.label not in tried]
    fits = [r for r in healthy if r.context >= need_tokens]
    if not fits:
        if healthy:
            largest = max(r.context for r in healthy)
            raise NoReplica(400, f"The request needs {need_tokens} tokens of context (prompt and max_tokens); the "
                                 f"largest context of a healthy replica is {largest} tokens")
        states = "; ".join(f"{r.label} ({r.spec.class_}): {'tried' if r.label in tried else r.why}"
                           for r in replicas if r.spec.class_ in classes) or "none is configured"
        raise NoReplica(503, f"No replica of class {', '.join(classes)} can take the request: {states}")
    load = lambda r: (r.in_flight / r.capacity, r.in_flight)  # noqa: E731
    for name in classes:  # the first class with room; within it the least loaded
        room = [r for r in fits if r.spec.class_ == name and r.in_flight < r.capacity]
        if room:
            return min(room, key=load)
    return min(fits, key=lambda r: (*load(r), classes.index(r.spec.class_)))  # all full: overflow to the least loaded


class _Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("llmops_router_requests", "routed requests by replica and status",
                                ["replica", "status"], registry=self.registry)
        self.retries = Counter("llmops_router_retries", "requests sent again elsewhere, by the replica that failed",
                               ["replica"], registry=self.registry)
        self.refused = Counter("llmops_router_refused", "requests no replica could take, by status", ["status"],
                               registry=self.registry)
        self.up = Gauge("llmops_router_replica_up", "1 while a replica is used", ["replica"], registry=self.registry)
        self.overhead = Histogram("llmops_router_overhead_seconds", "time a request spends in the router itself "
                                  "(all but the replica's answer)", registry=self.registry,
                                  buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5))


def _error(status: int, message: str, code: str | None = None, kind: str = "server_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": code}},
                        status_code=status)


class Router:
    """The replicas' states and the route section in force; `reload` swaps both, keeping counts of the same
    replicas."""

    def __init__(self, params: RouteParams, count_tokens: Callable[[dict], int]):
        self.count_tokens = count_tokens
        self.params: RouteParams
        self.replicas: list[ReplicaState] = []
        self.apply(params)

    def apply(self, params: RouteParams) -> None:
        old = {r.label: r for r in self.replicas}
        states = []
        for spec in params.replicas:
            declared = params.classes[spec.class_]
            state = ReplicaState(spec, declared.hardware, declared.variant)
            if (kept := old.get(spec.label)) is not None and kept.spec.url == spec.url:
                state.in_flight, state.info = kept.in_flight, kept.info
            states.append(state)
        self.params, self.replicas = params, states

    async def check(self, client: httpx.AsyncClient, metrics: _Metrics) -> None:
        """Read every replica's /health at once and set what each is."""
        await asyncio.gather(*(self._check(r, client) for r in self.replicas))
        for r in self.replicas:
            metrics.up.labels(r.label).set(int(r.up))

    async def _check(self, replica: ReplicaState, client: httpx.AsyncClient) -> None:
        try:
            response = await client.get(replica.spec.url.rstrip("/") + "/health",
                                        timeout=self.params.health_timeout_s)
            info = response.json() if response.status_code == 200 else None
        except (httpx.HTTPError, ValueError) as exc:
            self._down(replica, f"its /health did not answer: {type(exc).__name__}: {exc}")
            return
        if not isinstance(info, dict):
            self._down(replica, f"its /health answered {response.status_code}")
            return
        replica.info = info
        if (wrong := replica.mismatch(info)) is not None:
            self._down(replica, f"not used: {wrong}", level=logging.ERROR)
        elif not info.get("ready", True):
            self._down(replica, "its generation engine is not running")
        elif not replica.up:
            replica.up, replica.why = True, ""
            logger.warning("replica %s (%s) is up: %s %s, context %s", replica.label, replica.spec.class_,
                           info.get("hardware"), info.get("variant"), info.get("context"))

    def _down(self, replica: ReplicaState, why: str, level: int = logging.WARNING) -> None:
        if replica.up or replica.why != why:
            logger.log(level, "replica %s is out: %s", replica.label, why)
        replica.up, replica.why = False, why


def create_app(router: Router, identify: Callable[[str], str | None],
               reload: Callable[[], tuple[RouteParams, Callable[[], None]]] | None = None) -> FastAPI:
    """The router's app. `identify(authorization header)` names the caller's key or gives None (a 401); `reload`
    (on SIGHUP) returns the new route section and a function that applies the new keys."""
    metrics = _Metrics()
    state: dict[str, Any] = {}

    async def health_loop() -> None:
        while True:
            await asyncio.sleep(router.params.health_interval_s)
            try:
                await router.check(state["client"], metrics)
            except Exception as exc:  # noqa: BLE001 - one bad round must not end the checks for good
                logger.error("health check round failed: %s", exc)

    async def sighup() -> None:
        try:
            params, apply_keys = await asyncio.to_thread(reload)
        except Exception as exc:  # noqa: BLE001 - whatever is wrong with the new one, the old one keeps routing
            logger.error("reload refused, still routing as before: %s", exc)
            return
        router.apply(params)
        apply_keys()
        await router.check(state["client"], metrics)
        logger.warning("reloaded: %d replicas", len(router.replicas))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # no pool limit: our requests in flight are bounded by the replicas' concurrency, not by connections
        state["client"] = httpx.AsyncClient(timeout=httpx.Timeout(router.params.timeout_s, connect=2.0),
                                            limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))
        await router.check(state["client"], metrics)
        checks = asyncio.ensure_future(health_loop())
        if reload is not None:
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(sighup()))
        try:
            yield
        finally:
            checks.cancel()
            await state["client"].aclose()

    app = FastAPI(title="llmops router", lifespan=lifespan)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if request.url.path != "/health" and identify(request.headers.get("authorization", "")) is None:
            return _error(401, "Incorrect API key provided: send `Authorization: Bearer <key>`",
                          code="invalid_api_key", kind="invalid_request_error")
        return await call_next(request)

    app.add_middleware(BodyLimit, max_bytes=MAX_BODY_BYTES)  # as each replica's: a body is read whole to route it

    @app.get("/health")
    async def health():
        up = sum(r.up for r in router.replicas)
        return JSONResponse({"status": "ok" if up else "no replica up", "replicas_up": up,
                             "replicas": len(router.replicas)}, status_code=200 if up else 503)

    @app.get("/metrics")
    async def metrics_page():
        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/router/replicas")
    async def replicas():
        return {"replicas": [r.describe() for r in router.replicas]}

    @app.api_route("/v1/{path:path}", methods=["GET", "POST"])
    async def proxy(path: str, request: Request):
        started = time.perf_counter()
        try:
            body = await request.body()
        except ClientDisconnect:  # it left, or was cut off for sending too slowly (llmops/serving/http_server.py)
            return Response(status_code=CLIENT_CLOSED)
        try:
            parsed = json.loads(body) if body else {}
        except ValueError:
            parsed = None  # the replica names what is wrong with it
        parsed = parsed if isinstance(parsed, dict) else {}
        route = f"/v1/{path}"
        latency = parsed.get("stream") is True or request.headers.get(PRIORITY_HEADER, "").lower() == "latency"
        classes = router.params.policy.latency if latency else router.params.policy.default
        need = router.count_tokens(parsed) if route in RETRIED_ROUTES else 0
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_HEADERS}
        url_tail = route + (f"?{request.url.query}" if request.url.query else "")
        tried: set[str] = set()
        failures: list[str] = []
        while True:
            try:
                replica = choose(router.replicas, classes, need, frozenset(tried))
            except NoReplica as exc:
                metrics.refused.labels(str(exc.status)).inc()
                why = str(exc) + (f" (failed: {'; '.join(failures)})" if failures else "")
                return _error(exc.status, why, code="context_length_exceeded" if exc.status == 400 else
                              "no_replica_available", kind="invalid_request_error" if exc.status == 400 else
                              "server_error")
            tried.add(replica.label)
            replica.in_flight += 1
            upstream = time.perf_counter()
            try:
                out = state["client"].build_request(request.method, replica.spec.url.rstrip("/") + url_tail,
                                                    headers=headers, content=body)
                answer = await state["client"].send(out, stream=True)
                if answer.status_code == 503 and route in RETRIED_ROUTES and len(tried) <= router.params.retries:
                    await answer.aclose()  # its engine stopped (a reload, a shutdown): another one answers
                    raise httpx.RemoteProtocolError("it answered 503")
                if parsed.get("stream") is True and answer.status_code == 200:
                    metrics.overhead.observe(upstream - started)
                    return StreamingResponse(_relay(answer, replica, metrics), status_code=200,
                                             headers=_headers(answer, replica))
                content = await answer.aread()
                await answer.aclose()
            except (httpx.ReadTimeout, httpx.WriteTimeout) as exc:  # a slow replica, not a dead one: not sent again
                replica.in_flight -= 1
                metrics.refused.labels("504").inc()
                return _error(504, f"replica {replica.label} did not answer within {router.params.timeout_s:g} s "
                              f"(route.timeout_s): {type(exc).__name__}", code="replica_timeout")
            except httpx.HTTPError as exc:
                replica.in_flight -= 1
                failures.append(_failed(router, replica, exc, metrics))
                never_reached = isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout))
                if (never_reached or route in RETRIED_ROUTES) and len(tried) <= router.params.retries:
                    continue
                metrics.refused.labels("503").inc()
                return _error(503, f"No replica answered: {'; '.join(failures)}", code="no_replica_available")
            replica.in_flight -= 1
            metrics.requests.labels(replica.label, str(answer.status_code)).inc()
            metrics.overhead.observe(max(0.0, (time.perf_counter() - started) - answer.elapsed.total_seconds()))
            return Response(content, status_code=answer.status_code, headers=_headers(answer, replica))

    return app


def _failed(router: Router, replica: ReplicaState, exc: Exception, metrics: _Metrics) -> str:
    """Take a replica whose connection failed out of use (its /health brings it back) and say what happened."""
    why = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    router._down(replica, f"a request failed: {why}")
    metrics.up.labels(replica.label).set(0)
    metrics.retries.labels(replica.label).inc()
    return f"{replica.label}: {why}"


def _headers(answer: httpx.Response, replica: ReplicaState) -> dict[str, str]:
    kept = {k: v for k, v in answer.headers.items() if k.lower() not in _HOP_HEADERS}
    return kept | {REPLICA_HEADER: replica.label}


async def _relay(answer: httpx.Response, replica: ReplicaState, metrics: _Metrics):
    """A streamed answer, passed on as it comes; a replica lost mid-stream ends it with an error event (the tokens
    already sent cannot be taken back, so it is not sent again)."""
    try:
        async for chunk in answer.aiter_raw():
            yield chunk
        metrics.requests.labels(replica.label, "200").inc()
    except httpx.HTTPError as exc:
        metrics.requests.labels(replica.label, "502").inc()
        message = f"replica {replica.label} failed mid-stream: {type(exc).__name__}"
        yield f"data: {json.dumps({'error': {'message': message, 'type': 'server_error'}})}\n\n".encode()
    finally:
        replica.in_flight -= 1
        await answer.aclose()


def token_counter(tokenizer: Any) -> Callable[[dict], int]:
    """The context a request body needs: its prompt's tokens (chat through the template, as the server renders it)
    and its max_tokens (1 when it gives none: the server then fits the answer to what is left)."""

    def count(body: dict) -> int:
        asked = body.get("max_completion_tokens") or body.get("max_tokens")
        extra = asked if isinstance(asked, int) and asked > 0 else 1
        try:
            if isinstance(body.get("messages"), list):
                ids = tokenizer.apply_chat_template(body["messages"], add_generation_prompt=True, tokenize=True)
                ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
                return len(ids) + extra
            if isinstance(body.get("prompt"), str):
                return len(tokenizer(body["prompt"], add_special_tokens=False)["input_ids"]) + extra
        except Exception:  # noqa: BLE001 - a malformed body: the replica refuses it, naming the field
            pass
        return extra

    return count
