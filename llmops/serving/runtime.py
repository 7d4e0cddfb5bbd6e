"""A server's mutable runtime: what it serves now, and what changes that while it runs (reloads on SIGHUP and on
registry changes, a canary's rollback, the restart of a dead engine); its metrics, response cache and request log.

Handlers read `Runtime.served` once, when a request arrives: a reload swaps it, and requests in flight finish on the
engine they started on.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import signal
import statistics
import threading
from collections import deque
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import FastAPI
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from llmops.serving.cache import ResponseCache
from llmops.serving.callers import Callers
from llmops.serving.engine import Engine
from llmops.serving.feedback import Store
from llmops.serving.generation import RequestLog
from llmops.serving.requestlog import Writer
from llmops.serving.settings import CanaryLimits, ServerSettings

RESTART_DELAY_S = 1.0  # a dead engine is restarted this long after it is seen dead (a request that kills it each time
# cannot make it spin), and /health answers 503 meanwhile
logger = logging.getLogger("llmops.serving.runtime")


class Metrics:
    """The server's Prometheus metrics (/metrics), in a registry of its own."""

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


class CanaryWatch:
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


class Runtime:
    """What the server answers with now (`served`), and everything that changes it while it runs.

    With `reload`, SIGHUP loads what it returns (given what serves now) and swaps to it: new requests go to the new
    model at once, requests in flight finish on the old one, which then stops; where it returns the same engine, only
    the adapters changed (one no longer served is unloaded once its requests are done). A reload that fails keeps the
    old model serving. `on_change(served, error)` hears of the start and of each reload (the error of one that failed).
    With settings.watch_s, the server reloads by itself whenever `look()` returns something new (the registry's
    versions and stages). With settings.canary, a canary whose requests fare worse than production's by its limits is
    dropped: `drop(version, reason)` takes its stage (registry.drop), then the server reloads without it.
    """

    def __init__(self, settings: ServerSettings, served: Served, callers: Callers, store: Store,
                 reload: Callable[[Served], Served] | None = None,
                 on_change: Callable[[Served, str | None], None] | None = None,
                 look: Callable[[], object] | None = None, drop: Callable[[str, str], None] | None = None) -> None:
        self.settings, self.served, self.callers, self.store = settings, served, callers, store
        self.privacy = settings.privacy
        self.metrics = Metrics()
        self.cache = ResponseCache(settings.cache_entries, settings.cache_ttl_s)
        self.log = RequestLog(Writer(settings.log_dir), store, settings.privacy)
        # the served model's directory -> a copy of it for explanations (/v1/explain); one load at a time: concurrent
        # first calls each loading the copy broke transformers' loading ("Cannot copy out of meta tensor"), each a 500
        self.explainers: dict[tuple, tuple] = {}
        self.explainers_lock = threading.Lock()
        self._reload, self._look, self._drop = reload, look, drop
        self._notify = on_change or (lambda served, error: None)
        self._canary = CanaryWatch(settings.canary) if settings.canary is not None and drop is not None else None
        self._reloading = asyncio.Lock()
        self._retiring: set[Engine] = set()
        self._background: set[asyncio.Task] = set()  # tasks started from a request, kept until done
        self._closing = False  # becomes true once, when the server shuts down

    @asynccontextmanager
    async def lifespan(self, app: FastAPI):
        for engine in self.served.engines:
            self._start(engine)
        if self._reload is not None:
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(self.swap()))
        self._notify(self.served, None)
        watcher = (asyncio.ensure_future(self._watch())
                   if self.settings.watch_s > 0 and self._look is not None and self._reload is not None else None)
        supervisor = asyncio.ensure_future(self._supervise())
        try:
            yield
        finally:
            self._closing = True
            if watcher is not None:
                watcher.cancel()
            for engine in (*self.served.engines, *self._retiring):
                engine.stop()  # after uvicorn finished the requests in flight
            supervisor.cancel()

    def _start(self, engine: Engine) -> None:
        engine.on_step = self.metrics.batch.observe
        engine.start()

    async def swap(self) -> None:
        """Reload: serve what `reload` returns from now on."""
        async with self._reloading:  # signals that come while a reload runs wait for it
            self.cache.clear()  # whatever the reload gives: `llmops erase` reloads every server to drop cached answers
            try:
                await asyncio.to_thread(self.callers.refresh)  # revoked keys and a changed policy take effect now
                new = await asyncio.to_thread(self._reload, self.served)
                if self._closing:  # the server is shutting down: a started engine's thread would keep the process alive
                    return
                for engine in new.engines:
                    if engine not in self.served.engines:
                        self._start(engine)
            except Exception as exc:  # whatever failed, the model that serves now keeps serving
                logger.error("reload failed, still serving %s: %s", self.served.label, exc)
                self._notify(self.served, f"{type(exc).__name__}: {exc}")
                return
            old, self.served = self.served, new
            if new != old:
                logger.warning("reloaded: %s -> %s (adapters: %s; canary: %s)", old.label, new.label,
                               ", ".join(new.adapters), new.canary and new.canary[0])
            self._notify(new, None)
            if new.engine is old.engine:  # the same base: adapters no longer served go once their requests are done
                for gone in set(old.adapters) - set(new.adapters):
                    await new.engine.remove_adapter(gone)
            gone = [engine for engine in old.engines if engine not in new.engines]
            self._retiring.update(gone)
        for engine in gone:  # requests in flight finish on the engine they started on, which then stops
            await engine.drain()
            await asyncio.to_thread(engine.stop)
            self._retiring.discard(engine)

    def observe(self, version: str, ok: bool, latency_s: float) -> None:
        """A generation request that `version` answered (ok: not with a 5xx), towards the canary's verdict: a canary
        that fares worse is dropped (in the background: the response is not held)."""
        if self._canary is None:
            return
        self._canary.record(version, ok, latency_s)
        now = self.served
        if now.canary is None or version != now.canary[0] or self._canary.dropping:
            return
        reason = self._canary.breach(now.version, version)
        if reason is not None:
            self._canary.dropping = True  # one drop at a time
            self._background.add(task := asyncio.ensure_future(self._drop_canary(version, reason)))
            task.add_done_callback(self._background.discard)

    async def _drop_canary(self, version: str, reason: str) -> None:
        logger.error("dropping canary %s: %s", version, reason)
        try:
            await asyncio.to_thread(self._drop, version, reason)
        except Exception as exc:  # the registry refused (policy, remote): it keeps serving; look again later
            logger.error("could not drop canary %s: %s", version, exc)
        else:
            await self.swap()
        finally:
            self._canary.dropping = False

    async def _watch(self) -> None:
        seen = None
        while True:
            try:
                now = await asyncio.to_thread(self._look)
            except Exception as exc:  # e.g. the registry remote is unreachable for a moment: look again later
                logger.error("could not look for registry changes: %s", exc)
            else:
                if seen is not None and now != seen:
                    await self.swap()
                seen = now
            await asyncio.sleep(self.settings.watch_s)

    async def _supervise(self) -> None:
        """Restart a serving engine whose generation loop died (a request that made the sampler fail killed it for
        every later one): the requests it held failed with a 500, /health answers 503 until it runs again."""
        while True:
            await asyncio.sleep(0.2)
            for engine in self.served.engines:
                if self._closing or (failure := engine.failure) is None:
                    continue
                logger.error("the generation engine of %s died (%s: %s); restarting it in %g s", engine.model_dir,
                             type(failure).__name__, failure, RESTART_DELAY_S)
                await asyncio.sleep(RESTART_DELAY_S)
                if not self._closing and engine in self.served.engines:  # not swapped out meanwhile
                    engine.restart()
                    self.metrics.restarts.inc()
