"""One generation request's text as the engine produces it (cut at stop strings, timed), and the request log of the
generation routes."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from llmops.governance.privacy import Privacy
from llmops.serving.cache import Answer
from llmops.serving.engine import Sampling
from llmops.serving.feedback import Store
from llmops.serving.requestlog import Writer

if TYPE_CHECKING:
    from llmops.serving.runtime import Metrics, Target

logger = logging.getLogger("llmops.serving.generation")


def route_of(kind: str) -> str:
    """The route of a response `kind` (chat.completion, text_completion)."""
    return "/v1/chat/completions" if kind.startswith("chat") else "/v1/completions"


def stop_prefix(text: str, stops: list[str]) -> int:
    """The length of the longest end of `text` that begins a stop string (0: none): it may be the stop's start."""
    return max((k for stop in stops for k in range(min(len(stop) - 1, len(text)), 0, -1)
                if text.endswith(stop[:k])), default=0)


async def whole(run: Generation) -> str:
    return "".join([piece async for piece in run])


class Generation:
    """One request's text as it is generated: decoded incrementally, cut at a stop string, with its timings.

    With `replay`, the text is a cached answer's (no forward pass); with `keep`, a complete answer is handed to it
    (for the response cache)."""

    def __init__(self, ids: list[int], sampling: Sampling, stops: list[str], metrics: Metrics, target: Target,
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
                ready = len(text) if cut >= 0 else len(text) - stop_prefix(text, self.stops)
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


class RequestLog:
    """Every request to a generation route, as a JSON line (see requestlog): the monitor reads these. Answered ones
    carry their prompt and answer with PII masked, and go into the feedback store too, so feedback can name them."""

    def __init__(self, writer: Writer, store: Store, privacy: Privacy):
        self.writer, self.store, self.privacy = writer, store, privacy

    async def answered(self, rid: str, kind: str, version: str | None, run: Generation, prompt: str, answer: str,
                       user: str | None) -> None:
        mask = self.privacy.for_log
        prompt, answer, user = await asyncio.to_thread(lambda: (mask(prompt), mask(answer), user and mask(user)))
        self._write({
            "request_id": rid, "route": route_of(kind), "model_version": version, "status": 200,
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
