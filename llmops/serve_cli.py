"""`llmops serve`: run the OpenAI-compatible server on a model directory or a registered version; make API keys."""

from __future__ import annotations

import argparse
import os
import secrets
import sys
from pathlib import Path

from llmops.errors import LlmopsError

DEFAULT_KEYS = Path(os.environ.get("XDG_CONFIG_HOME", Path.home() / ".config")) / "llmops" / "api_keys"
STATE = Path(".llmops/serve")


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "serve", help="serve a model over an OpenAI-compatible HTTP API (continuous batching, API keys, metrics)",
        description="Serve the production version (default), a registered version, or a model directory.")
    parser.add_argument("action", nargs="?", choices=["keygen"], help="keygen: make an API key, store its hash")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--version", help="a registered version (v3) or stage (production, staging)")
    which.add_argument("--model", help="a model directory (safetensors weights, tokenizer)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--keys", default=str(DEFAULT_KEYS),
                        help=f"file of accepted key hashes (default {DEFAULT_KEYS}; also ${{LLMOPS_API_KEY_HASHES}})")
    parser.add_argument("--max-concurrency", type=int, default=16, help="requests generated together")


def main(args: argparse.Namespace) -> int:
    try:
        if args.action == "keygen":
            return _keygen(Path(args.keys))
        return _serve(args)
    except LlmopsError as exc:
        print(f"error: serve: {exc}", file=sys.stderr)
        return 1


def _keygen(path: Path) -> int:
    from llmops.server import hash_key

    key = "sk-llmops-" + secrets.token_urlsafe(32)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        os.chmod(path, 0o600)
        fh.write(hash_key(key) + "\n")
    print(key)
    print(f"(only its hash is kept, in {path}; this is the one time the key is shown)", file=sys.stderr)
    return 0


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from llmops import registry
    from llmops.engine import Engine
    from llmops.server import create_app, load_key_hashes

    keys = load_key_hashes(args.keys)
    if not keys:
        raise LlmopsError(f"no API keys: make one with `llmops serve keygen` (stored hashed in {args.keys}) or set "
                          "LLMOPS_API_KEY_HASHES")
    version = None
    if args.model:
        model_dir = Path(args.model)
    else:
        ref = args.version or "production"
        try:
            version = registry.resolve(Path.cwd(), ref).version
        except registry.RegistryError as exc:
            hint = ("; promote one (`llmops registry promote vN --to production --why ...`) or pass --model DIR"
                    if ref in registry.STAGES else "")
            raise LlmopsError(f"{exc}{hint}") from None
        model_dir = STATE / "models" / version
        if not (model_dir / "release.json").is_file():
            registry.pull(Path.cwd(), version, model_dir)
    engine = Engine(model_dir, max_concurrency=args.max_concurrency)
    name = f"{registry.ARTIFACT}-{version}" if version else model_dir.name
    app = create_app(engine, name, keys, STATE / "requests.jsonl", version=version)
    print(f"serving {name} at http://{args.host}:{args.port}/v1 (OpenAI-compatible; Authorization: Bearer <key>)",
          flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=30)
    return 0
