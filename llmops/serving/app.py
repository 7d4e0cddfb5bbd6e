"""The OpenAI-compatible HTTP server: one model, continuous batching, API keys, Prometheus metrics, request logs.

Routes: /v1/completions and /v1/chat/completions (streamed over SSE or not), /v1/models,
/v1/feedback (a rating of an answer, by its response id), /v1/explain, /health (open: for a
load balancer), /ready, /metrics, each in a router of routes/. Every route but /health needs
`Authorization: Bearer <key>`, /metrics included. Bad requests get a 4xx with an OpenAI-style
error body naming the field; nothing a client sends reaches a 500. What the routes share while
the server runs (what it serves now, its reloads, metrics, cache and request log) is its
Runtime, in the app's state.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Route

from llmops.serving.body_limit import MAX_BODY_BYTES, BodyLimit
from llmops.serving.callers import Callers
from llmops.serving.feedback import Store
from llmops.serving.routes import explain, feedback, health, openai
from llmops.serving.routes.common import error
from llmops.serving.runtime import Runtime, Served
from llmops.serving.settings import ServerSettings

OPEN_PATHS = ("/health",)
GENERATION_ROUTES = ("/v1/completions", "/v1/chat/completions")
ROUTERS = (health.router, openai.router, feedback.router, explain.router)


def create_app(settings: ServerSettings, served: Served, callers: Callers, store: Store,
               reload: Callable[[Served], Served] | None = None,
               on_change: Callable[[Served, str | None], None] | None = None,
               look: Callable[[], object] | None = None, drop: Callable[[str, str], None] | None = None) -> FastAPI:
    """The app answering with `served`, as `settings` say; requests are logged as JSON lines under settings.log_dir
    (see requestlog) and recorded in `store`, which keeps the feedback on them. `reload`, `on_change`, `look` and
    `drop`: see Runtime."""
    runtime = Runtime(settings, served, callers, store, reload, on_change, look, drop)
    app = FastAPI(title="llmops", lifespan=runtime.lifespan)
    app.state.runtime = runtime
    for router in ROUTERS:
        app.include_router(router)
    # /metrics labels from a fixed set, the routes (FastAPI's own included): the raw path of every probe (20,000 of
    # them, an email in one) grew /metrics to 36 MB, and one scrape took 22 s on the event loop. Each router's own
    # routes are read from it: app.routes holds an included router, not its routes
    app.state.paths = frozenset(route.path for router in (app.router, *ROUTERS) for route in router.routes
                                if isinstance(route, Route))
    app.middleware("http")(_guard)
    app.add_middleware(BodyLimit, max_bytes=MAX_BODY_BYTES)  # outermost: before authentication reads anything
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    return app


async def _guard(request: Request, call_next):
    """Every request: its key checked, then counted in the metrics (and the canary's verdict), and a generation
    route's refusal logged (answered ones are logged with their text)."""
    runtime: Runtime = request.app.state.runtime
    started = time.perf_counter()
    route = request.url.path
    request.state.caller = runtime.callers.identify(request.headers.get("authorization", ""))
    if route not in OPEN_PATHS and request.state.caller is None:
        response = error(401, "Incorrect API key provided: send `Authorization: Bearer <key>`", code="invalid_api_key")
    else:
        response = await call_next(request)
    elapsed = time.perf_counter() - started
    version = getattr(request.state, "version", None) or ""  # set by a generation route once it picked
    label = route if route in request.app.state.paths else "other"
    runtime.metrics.requests.labels(label, str(response.status_code), version).inc()
    runtime.metrics.latency.labels(label, version).observe(elapsed)
    if route in GENERATION_ROUTES and version:
        runtime.observe(version, response.status_code < 500, elapsed)
    if route in GENERATION_ROUTES and response.status_code >= 400:
        runtime.log.failed(route, response.status_code, elapsed)
    return response


async def _invalid(request: Request, exc: RequestValidationError):
    first = exc.errors()[0]
    if first.get("type") == "json_invalid":
        return error(400, "the body is not valid JSON")
    param = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
    if param is None:
        return error(400, "the body must be a JSON object (Content-Type: application/json)")
    return error(400, f"{param}: {first.get('msg')}", param=param)


async def _http_error(request: Request, exc: StarletteHTTPException):
    return error(exc.status_code, str(exc.detail))
