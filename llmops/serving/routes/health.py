"""/health (open: for load balancers and `llmops route`), /ready and /metrics."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from llmops.serving.routes.common import RuntimeDep, error

router = APIRouter()


@router.get("/health")
async def health(runtime: RuntimeDep):
    # open, for load balancers and `llmops route`: what this replica runs on, and how busy it is; a 503 while an
    # engine is down (a liveness probe acts on it; the server restarts the engine by itself first)
    now = runtime.served
    up = all(engine.healthy for engine in now.engines)
    return JSONResponse({"status": "ok" if up else "engine down", "ready": up, "model": now.name,
                         "version": now.version, **now.engine.describe()}, status_code=200 if up else 503)


@router.get("/ready")
async def ready(runtime: RuntimeDep):
    now = runtime.served
    if not now.engine.healthy:
        return error(503, "the generation engine is not running", kind="server_error")
    return {"status": "ready", "model": now.name, "version": now.version}


@router.get("/metrics")
async def metrics_page(runtime: RuntimeDep):
    stats = runtime.served.engine.stats()
    runtime.metrics.running.set(stats.running)
    runtime.metrics.waiting.set(stats.waiting)
    return PlainTextResponse(generate_latest(runtime.metrics.registry), media_type=CONTENT_TYPE_LATEST)
