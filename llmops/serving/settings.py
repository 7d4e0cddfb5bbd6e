"""A server's settings, resolved once at its start: the project's params.yaml (deploy, and validate_data's personal
data detectors), then `llmops serve start`'s flags over them. The server reads nothing else after.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmops.core import layout
from llmops.core.config import DeployParams, Params
from llmops.core.errors import LlmopsError
from llmops.governance.privacy import Privacy
from llmops.registry import versions as registry

DEFAULT_PORT = 8000


@dataclass(frozen=True)
class CanaryLimits:
    """When a canary is dropped by itself (deploy.canary_*): against production's recent requests, once each side has
    `min_requests`."""

    min_requests: int
    max_error_rate_increase: float  # canary's share of 5xx minus production's
    max_latency_ratio: float  # canary's median latency over production's (answered requests)


@dataclass(frozen=True)
class ServerSettings:
    """What a server serves, and how."""

    root: Path  # where it runs: its request log, feedback database and instance record are there
    project: bool  # root is a project (a params.yaml): its access policy applies and its audit trail records
    model: str | None  # a model directory served as it is; None: registered versions
    ref: str  # what it follows on reload: the model directory, a stage, or a version (v3.0.0)
    adapters: bool  # the followed version's base once, and every registered version on it as a LoRA adapter
    host: str
    port: int
    keys: str  # the file of the accepted API keys' hashes
    max_concurrency: int
    device: str | None  # cpu or cuda; None: a GPU when there is one
    context: int | None  # tokens per request; None: the model's
    cache_entries: int  # 0: no response cache
    cache_ttl_s: float
    read_timeout_s: float
    privacy: Privacy
    max_adapters: int
    watch_s: float  # how often it looks for registry changes; 0: only on `llmops serve reload`
    canary: CanaryLimits | None  # None: it serves no canary (a model directory)

    @property
    def log_dir(self) -> Path:
        return self.root / layout.REQUESTS

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    @property
    def engine_options(self) -> dict[str, Any]:
        """The keyword arguments of each Engine it loads."""
        return {"max_concurrency": self.max_concurrency, "device": self.device, "max_context": self.context}


def resolve(root: Path, params: Params | None, flags: argparse.Namespace) -> ServerSettings:
    """The settings of a server started in `root` with `flags` (`llmops serve start`'s): a flag given wins, and what
    no flag gives comes from `params` (None: outside a project, where the defaults apply).

    Raises:
        LlmopsError: flags that cannot be served (or a version that is none), saying which.
    """
    deploy = params.deploy if params is not None else DeployParams()
    ref = flags.model or flags.version or "production"
    if not flags.model and ref not in registry.STAGES:
        ref = registry.normalize(ref)
    if flags.adapters and (flags.model or params is None):
        raise LlmopsError("--adapters serves registered versions: run it in the project, without --model")
    if flags.context is not None and flags.context < 2:
        raise LlmopsError(f"--context {flags.context}: a request needs at least 2 tokens (a prompt and an answer)")
    if flags.read_timeout is not None and not flags.read_timeout > 0:
        raise LlmopsError(f"--read-timeout {flags.read_timeout}: give a number of seconds above 0")
    if params is None:
        privacy = Privacy(mode=flags.privacy or "mask")
    else:  # validate_data's detectors: what counts as personal data in the training data counts here too
        privacy = Privacy(mode=flags.privacy or deploy.privacy, kinds=tuple(params.validate_data.pii),
                          regions=tuple(params.validate_data.phone_regions))
    return ServerSettings(
        root=root, project=params is not None, model=flags.model, ref=ref, adapters=flags.adapters, host=flags.host,
        port=flags.port or DEFAULT_PORT, keys=flags.keys, max_concurrency=flags.max_concurrency, device=flags.device,
        context=flags.context,
        cache_entries=deploy.cache_entries if flags.cache_entries is None else flags.cache_entries,
        cache_ttl_s=deploy.cache_ttl_s,
        read_timeout_s=deploy.read_timeout_s if flags.read_timeout is None else flags.read_timeout,
        privacy=privacy, max_adapters=deploy.max_adapters,
        watch_s=deploy.watch_s if flags.adapters else 0,  # new versions are served without a reload
        # a server of registered versions serves production's canary, and drops one that fares worse
        canary=None if flags.model else CanaryLimits(deploy.canary_min_requests, deploy.canary_max_error_rate_increase,
                                                     deploy.canary_max_latency_ratio))
