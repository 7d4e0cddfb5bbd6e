"""Who may call a server: its API keys and, in a project, the access policy on the models."""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable
from pathlib import Path

from llmops.governance import access, apikeys, audit

logger = logging.getLogger("llmops.serving.callers")


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
