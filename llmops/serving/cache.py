"""Identical greedy requests answered from memory instead of a forward pass.

A request is cacheable when its answer is determined by what it asks: greedy (temperature 0),
so that the same model, prompt tokens, token limit and stop strings give the same text (the
server's greedy answers equal `generate()`'s). Sampled requests always generate. The key holds
the exact model label (`model@v3.0.0`, the adapter included), so a reload to another version or
adapter never answers from the old one. Entries are bounded in number and expire after a TTL
(cachetools' TTLCache, least recently used first when full); only the event loop touches it.
"""

from __future__ import annotations

from dataclasses import dataclass

from cachetools import TTLCache

from llmops.serving.engine import Sampling


@dataclass(frozen=True)
class Answer:
    text: str  # as the client got it: stop strings cut, before privacy masking (applied on the way out, each time)
    finish_reason: str
    completion_tokens: int


class ResponseCache:
    """`max_entries` answers (0: no cache) kept for `ttl_s` seconds."""

    def __init__(self, max_entries: int, ttl_s: float):
        self._entries: TTLCache | None = TTLCache(maxsize=max_entries, ttl=ttl_s) if max_entries > 0 else None

    def key(self, caller: str, model: str, ids: list[int], sampling: Sampling, stops: list[str]) -> tuple | None:
        """The request's key, or None when it is not cacheable (sampled, or no cache). Per caller (the API key's
        name): one caller's hit must not tell another what was asked before, nor answer it from another's prompt."""
        if self._entries is None or sampling.temperature != 0:
            return None
        return caller, model, tuple(ids), sampling.max_tokens, sampling.ignore_eos, tuple(stops)

    def clear(self) -> None:
        """Forget every answer (a reload does: an erasure sends one, so no cached answer keeps an erased subject)."""
        if self._entries is not None:
            self._entries.clear()

    def get(self, key: tuple | None) -> Answer | None:
        return None if key is None else self._entries.get(key)

    def put(self, key: tuple | None, answer: Answer) -> None:
        if key is not None:
            self._entries[key] = answer
