"""`llmops route`: the router (llmops/serving/router.py) in front of the replicas in params.yaml's `route` section."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from llmops.governance import apikeys
from llmops.core.errors import LlmopsError


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "route", help="one OpenAI-compatible endpoint in front of several servers, routing by hardware class, "
        "context and load (params: route)",
        description="Route requests to the replicas in params.yaml's route section (each an `llmops serve start`, "
        "with --device and, for a small one, --context), by route.policy; health-checked, with retries. SIGHUP "
        "reads the route section and the API keys again.")
    parser.add_argument("--host", help="default route.host")
    parser.add_argument("--port", type=int, help="default route.port")
    parser.add_argument("--keys", default=str(apikeys.DEFAULT_FILE),
                        help=f"the servers' API keys file (default {apikeys.DEFAULT_FILE}; also ${{{apikeys.KEYS_ENV}}})")


def main(args: argparse.Namespace) -> int:
    try:
        return _route(Path.cwd(), args)
    except LlmopsError as exc:
        print(f"error: route: {exc}", file=sys.stderr)
        return 1


def _section(root: Path):
    from llmops.core.config import PARAMS_FILE, ConfigError, load_params

    try:
        return load_params(root / PARAMS_FILE).route
    except ConfigError as exc:
        raise LlmopsError(str(exc)) from None


def _route(root: Path, args: argparse.Namespace) -> int:
    from llmops.serving import http_server
    from llmops.serving.router import Router, create_app, token_counter
    from llmops.serving.callers import Callers

    params = _section(root)
    if not params.replicas:
        raise LlmopsError("route.replicas is empty: list the servers to route to (each {url, class}) in params.yaml")
    callers = Callers(lambda: apikeys.load(args.keys), None)  # the access policy is each replica's to apply
    if not callers.keys:
        raise LlmopsError(f"no API keys: the router takes the servers' keys ({args.keys} or {apikeys.KEYS_ENV})")
    router = Router(params, token_counter(_tokenizer(root, params.tokenizer)))

    def reload():
        new = _section(root)
        keys = apikeys.load(args.keys)
        return new, lambda: setattr(callers, "keys", keys)

    app = create_app(router, callers.identify, reload=reload)
    host, port = args.host or params.host, args.port or params.port
    names = ", ".join(f"{r.label} ({r.spec.class_})" for r in router.replicas)
    print(f"routing at http://{host}:{port}/v1 to {names} (their states: /router/replicas)", flush=True)
    http_server.run(app, host, port, params.read_timeout_s)
    return 0


def _tokenizer(root: Path, name: str | None):
    """route.tokenizer, or the production release's (the one its servers use), to count a prompt's tokens."""
    from llmops.registry import versions as registry
    from llmops.serving import instances as servers
    from llmops.training.modeling import ModelError, load_tokenizer

    try:
        if name is None:
            name = str(servers.model_dir(root, registry.resolve(root, "production").version))
        return load_tokenizer(name)
    except (ModelError, registry.RegistryError) as exc:
        raise LlmopsError(f"route.tokenizer: {exc} (name a tokenizer in route.tokenizer)") from None
