"""`llmops serve`: run the OpenAI-compatible server on a model directory or a registered version; make API keys."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from llmops import registry, servers
from llmops.errors import LlmopsError

DEFAULT_KEYS = Path(os.environ.get("XDG_CONFIG_HOME", Path.home() / ".config")) / "llmops" / "api_keys"


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "serve", help="serve a model over an OpenAI-compatible HTTP API (continuous batching, API keys, metrics)",
        description="Serve the production version (default), a registered version, or a model directory. "
        "status, stop and reload act on this project's running servers.")
    parser.add_argument("action", nargs="?", choices=["keygen", "status", "stop", "reload"],
                        help="keygen: make an API key, store its hash; status: the running servers; stop: stop them "
                        "(finishing requests in flight); reload: make them load what their ref names now")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--version", help="a registered version (v3) or stage (production, staging); a server on a "
                       "stage follows it on reload")
    which.add_argument("--model", help="a model directory (safetensors weights, tokenizer)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, help="default 8000; for stop and reload: only the server on this port")
    parser.add_argument("--keys", default=str(DEFAULT_KEYS),
                        help=f"file of accepted key hashes (default {DEFAULT_KEYS}; also ${{LLMOPS_API_KEY_HASHES}})")
    parser.add_argument("--max-concurrency", type=int, default=16, help="requests generated together")


def main(args: argparse.Namespace) -> int:
    try:
        if args.action == "keygen":
            return _keygen(Path(args.keys))
        if args.action == "status":
            return _status()
        if args.action in ("stop", "reload"):
            return _each(args.action, args.port)
        return _serve(args)
    except LlmopsError as exc:
        print(f"error: serve: {exc}", file=sys.stderr)
        return 1


def _keygen(path: Path) -> int:
    from llmops.server import hash_key, new_key

    key = new_key()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        os.chmod(path, 0o600)
        fh.write(hash_key(key) + "\n")
    print(key)
    print(f"(only its hash is kept, in {path}; this is the one time the key is shown)", file=sys.stderr)
    return 0


def describe(server: servers.Server) -> str:
    what = f"{registry.ARTIFACT} {server.version}" if server.version else server.model
    follows = f", follows {server.ref}" if server.ref != server.version else ""
    error = f"; last reload failed: {server.reload_error}" if server.reload_error else ""
    return f"{server.url}  {what}{follows}  (pid {server.pid}, up since {server.started[:19]}){error}"


def _status() -> int:
    found = servers.running(Path.cwd())
    for server in found:
        print(describe(server))
    if not found:
        print("no llmops server is running in this project (`llmops serve`, or `llmops run` deploys one)")
        return 3  # as `systemctl status` does for a unit that is not running
    return 0


def _each(action: str, port: int | None) -> int:
    root = Path.cwd()
    found = [s for s in servers.running(root) if port is None or s.port == port]
    if not found:
        raise LlmopsError(f"no llmops server is running in this project{f' on port {port}' if port else ''}")
    for server in found:
        if action == "stop":
            servers.stop(root, server)
            print(f"stopped {server.url} ({server.version or server.model})")
        else:
            print(f"reloaded {describe(servers.reload(root, server, timeout_s=600))}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from llmops.engine import Engine
    from llmops.feedback import Store, database_url
    from llmops.requestlog import LOG_DIR
    from llmops.server import Served, create_app, load_key_hashes

    keys = load_key_hashes(args.keys)
    if not keys:
        raise LlmopsError(f"no API keys: make one with `llmops serve keygen` (stored hashed in {args.keys}) or set "
                          "LLMOPS_API_KEY_HASHES")
    root = Path.cwd()
    port = args.port or 8000
    ref = args.model or args.version or "production"  # what the server follows: a directory, a stage or a version
    if not args.model and ref not in registry.STAGES:
        ref = registry.normalize(ref)

    def load() -> Served:
        if args.model:
            return Served(Engine(args.model, max_concurrency=args.max_concurrency), Path(args.model).resolve().name)
        version = _resolve(root, ref)
        return Served(Engine(servers.model_dir(root, version), max_concurrency=args.max_concurrency),
                      registry.ARTIFACT, version)

    url = f"http://{args.host}:{port}/v1"
    started = servers.now()

    state = {"loaded": started, "reloads": -1}  # the first call is the start

    def on_change(served: Served, error: str | None) -> None:
        state["reloads"] += 1
        if error is None:
            state["loaded"] = servers.now()
        servers.record(root, servers.Server(pid=os.getpid(), url=url, port=port, ref=ref, model=served.name,
                                            version=served.version, started=started, loaded=state["loaded"],
                                            reload_error=error, reloads=state["reloads"]))

    store = Store(database_url(root))  # an unusable feedback database stops here, before the model loads
    served = load()  # a bad model or an unknown version stops here, with its reason
    app = create_app(served, keys, root / LOG_DIR, store, reload=load, on_change=on_change)
    print(f"serving {served.label} at {url} (OpenAI-compatible; Authorization: Bearer <key>)", flush=True)
    try:
        uvicorn.run(app, host=args.host, port=port, log_level="warning", timeout_graceful_shutdown=30)
    finally:
        servers.forget(root, port, os.getpid())
    return 0


def _resolve(root: Path, ref: str) -> str:
    try:
        return registry.resolve(root, ref).version
    except registry.RegistryError as exc:
        hint = ("; promote one (`llmops registry promote vN --to production --why ...`) or pass --model DIR"
                if ref in registry.STAGES else "")
        raise LlmopsError(f"{exc}{hint}") from None
