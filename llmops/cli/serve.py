"""`llmops serve`: run the OpenAI-compatible server on a model directory or a registered version; make API keys."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
from pathlib import Path

from llmops.cli import output
from llmops.core import forkserver
from llmops.governance import apikeys
from llmops.governance import audit
from llmops.registry import versions as registry
from llmops.serving import instances as servers
from llmops.core.config import PARAMS_FILE
from llmops.core.errors import LlmopsError


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "serve", help="serve a model over an OpenAI-compatible HTTP API (continuous batching, API keys, metrics)",
        description="start: serve a model. status, stop and reload act on this project's running servers; keygen, "
        "revoke and keys manage its API keys (allowed by the access policy, recorded in the audit trail); manifests "
        "writes the Kubernetes manifests for vLLM.")
    # each action its own subcommand, so that a flag of the server is refused with an action (and each help is short)
    actions = parser.add_subparsers(dest="serve_action", required=True, metavar="ACTION")

    start = actions.add_parser(
        "start", help="serve production (default), a registered version or a model directory",
        description="Serve the production version (default), a registered version, or a model directory over an "
        "OpenAI-compatible HTTP API, until stopped (Ctrl-C, SIGTERM or `llmops serve stop`).")
    which = start.add_mutually_exclusive_group()
    which.add_argument("--version", help="a registered version (v3) or stage (production, staging); a server on a "
                       "stage follows it on reload")
    which.add_argument("--model", help="a model directory (safetensors weights, tokenizer)")
    start.add_argument("--host", default="127.0.0.1")
    start.add_argument("--port", type=int, help="default 8000")
    _keys_file(start)
    start.add_argument("--max-concurrency", type=int, default=16, help="requests generated together")
    start.add_argument("--device", choices=["cpu", "cuda"],
                       help="where the model runs (default: a CUDA GPU when there is one); a replica declares it to "
                       "`llmops route` this way, and cuda on a machine without one is refused")
    start.add_argument("--context", type=int, help="at most this many tokens per request (prompt and answer; default "
                       "the model's): a smaller KV cache, for a replica with little memory")
    start.add_argument("--cache-entries", type=int, help="greedy answers the response cache keeps; 0: no cache "
                       "(default: the project's deploy.cache_entries, else 1024)")
    start.add_argument("--adapters", action="store_true",
                       help="hold the followed version's base once and serve, as LoRA adapters on it, every registered "
                       "version built on it (asked for as model@vN; deploy.max_adapters of them), loading new ones "
                       "as they are registered (deploy.watch_s)")
    start.add_argument("--read-timeout", type=float, help="seconds a request's head and body have to arrive "
                       "(default deploy.read_timeout_s)")
    start.add_argument("--privacy", choices=["mask", "refuse", "log"],
                       help="personal data in prompts and answers (default: the project's deploy.privacy, else mask)")

    for name, does in (("keygen", "make an API key NAME and print it; only its hash is stored"),
                       ("revoke", "remove the API key NAME (running servers drop it on `llmops serve reload`)")):
        key = actions.add_parser(name, help=does, description=f"{does[0].upper()}{does[1:]}. Allowed by the access "
                                 "policy, recorded in the audit trail: run it in the project.")
        key.add_argument("name", metavar="NAME", help="the key's name (its identity in the access policy: key:NAME)")
        _keys_file(key)
    keys = actions.add_parser("keys", help="the API keys' names, one a line")
    _keys_file(keys)
    output.add_json(keys, "one JSON object per key and line (name)")
    status = actions.add_parser("status", help="this project's running servers (exit 3 if none)")
    output.add_json(status, "one JSON object per server and line")
    for name, does in (("stop", "stop this project's running servers, finishing requests in flight"),
                       ("reload", ("make this project's running servers load what their ref names now, and the API "
                                   "keys and the access policy"))):
        each = actions.add_parser(name, help=does)
        each.add_argument("--port", type=int, help="only the server on this port")
    manifests = actions.add_parser("manifests", help="write the Kubernetes manifests for vLLM serving production and "
                                   "its canary (deploy.vllm)")
    manifests.add_argument("--out", help="the directory (default deploy.vllm.out)")


def _keys_file(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--keys", default=str(apikeys.DEFAULT_FILE),
                        help=f"file of accepted keys' hashes and names (default {apikeys.DEFAULT_FILE}; also "
                        f"${{{apikeys.KEYS_ENV}}})")


def main(args: argparse.Namespace) -> int:
    action = args.serve_action
    try:
        if action in ("keygen", "revoke"):
            if not (Path.cwd() / PARAMS_FILE).is_file():
                raise LlmopsError(f"{action}: run it in the project whose access policy allows it and whose audit "
                                  f"trail records it (no {PARAMS_FILE} here)")
            if action == "keygen":
                print(apikeys.create(Path.cwd(), args.keys, args.name))
                print(f"(only its hash is kept, in {args.keys}; this is the one time the key is shown)", file=sys.stderr)
            else:
                apikeys.revoke(Path.cwd(), args.keys, args.name)
                print(f"revoked {args.name}; running servers drop it on `llmops serve reload`")
            return 0
        if action == "keys":
            names = sorted(apikeys.load(args.keys).values())
            # one name a line, no header: a list of names, for `for k in $(llmops serve keys)`
            output.show(output.json_lines({"name": n} for n in names) if args.json else "\n".join(names))
            return 0
        if action == "status":
            return _status(args.json)
        if action == "manifests":
            from llmops.serving import vllm_manifests

            print(f"wrote {vllm_manifests.write(Path.cwd(), _params(Path.cwd()), args.out)} (kubectl apply -f it)")
            return 0
        if action in ("stop", "reload"):
            return _each(action, args.port)
        return _serve(args)
    except LlmopsError as exc:
        print(f"error: serve: {exc}", file=sys.stderr)
        return 1


def _serves(server: servers.Server) -> str:
    what = f"{registry.ARTIFACT} {server.version}" if server.version else server.model
    if server.adapters:
        what += f" (adapters on one base: {', '.join(server.adapters)})"
    if server.canary:
        what += f", canary {server.canary}"
    return what + (f", follows {server.ref}" if server.ref != server.version else "")


def describe(server: servers.Server) -> str:
    error = f"; last reload failed: {server.reload_error}" if server.reload_error else ""
    return f"{server.url}  {_serves(server)}  (pid {server.pid}, up since {server.started[:19]}){error}"


def _status(as_json: bool) -> int:
    found = servers.running(Path.cwd())
    if as_json:
        text = output.json_lines(dataclasses.asdict(s) for s in found)
    elif found:
        text = output.table(["URL", "PID", "SINCE", "SERVES"], (
            [s.url, s.pid, s.started[:19], _serves(s) + (f"; last reload failed: {s.reload_error}" if s.reload_error
                                                         else "")] for s in found))
    else:
        text = "no llmops server is running in this project (`llmops serve start`, or `llmops run` deploys one)"
    output.show(text)
    return 0 if found else 3  # as `systemctl status` does for a unit that is not running


def _each(action: str, port: int | None) -> int:
    root = Path.cwd()
    # in a project, the policy's to allow and the trail's to record: it changes what production answers (outside one,
    # a server of `--model DIR` has neither)
    project = (root / PARAMS_FILE).is_file()
    who = audit.require(root, f"serve.{action}", "servers", ("operate", "servers")) if project else None
    found = [s for s in servers.running(root) if port is None or s.port == port]
    if not found:
        raise LlmopsError(f"no llmops server is running in this project{f' on port {port}' if port else ''}")
    for server in found:
        with (audit.recorded(root, f"serve.{action}", f"server:{server.port}", server.version, who=who) if project
              else contextlib.nullcontext()):
            if action == "stop":
                servers.stop(root, server)
                print(f"stopped {server.url} ({server.version or server.model})")
            else:
                print(f"reloaded {describe(servers.reload(root, server, timeout_s=600))}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from llmops.serving import http_server
    from llmops.serving import settings as server_settings
    from llmops.serving.app import create_app
    from llmops.serving.callers import Callers
    from llmops.serving.engine import Engine
    from llmops.serving.feedback import Store, database_url
    from llmops.serving.runtime import Served

    root = Path.cwd()
    in_project = (root / PARAMS_FILE).is_file()
    settings = server_settings.resolve(root, _params(root) if in_project else None, args)
    # from here on, the settings alone: no flag and no params.yaml value is read again
    callers = Callers(lambda: apikeys.load(settings.keys) | _deploy_key(root), root if settings.project else None)
    if not callers.keys:
        raise LlmopsError(f"no API keys: make one with `llmops serve keygen NAME` (stored hashed in {settings.keys}) "
                          f"or set {apikeys.KEYS_ENV}")
    if not settings.project:
        print(f"note: no {PARAMS_FILE} here, so no access policy: every valid key may call", flush=True)
    options = settings.engine_options

    def load(now: Served | None = None) -> Served:
        if settings.model:
            return Served(Engine(settings.model, **options), Path(settings.model).resolve().name)
        if settings.adapters:
            return _adapters(settings, now)
        version = _resolve(root, settings.ref)
        if now is not None and now.version == version:  # only the canary changed: production stays loaded
            engine = now.engine
        elif now is not None and now.canary_engine is not None and now.canary[0] == version:  # the canary promoted
            engine = now.canary_engine
        else:
            engine = Engine(servers.model_dir(root, version), **options)
        held = registry.canary(root) if settings.ref == "production" else None
        if held is None or held.version.version == version:
            return Served(engine, registry.ARTIFACT, version)
        canary = held.version.version  # a second engine: a one-model server holds the canary's model beside it
        reuse = now is not None and now.canary_engine is not None and now.canary[0] == canary
        canary_engine = now.canary_engine if reuse else Engine(servers.model_dir(root, canary), **options)
        return Served(engine, registry.ARTIFACT, version, canary=(canary, held.share), canary_engine=canary_engine)

    started = servers.now()

    state = {"loaded": started, "reloads": -1}  # the first call is the start

    def on_change(served: Served, error: str | None) -> None:
        state["reloads"] += 1
        if error is None:
            state["loaded"] = servers.now()
        servers.record(root, servers.Server(pid=forkserver.own_pid(), url=settings.url, port=settings.port,
                                            ref=settings.ref, model=served.name, version=served.version, started=started,
                                            loaded=state["loaded"], reload_error=error, reloads=state["reloads"],
                                            adapters=list(served.adapters),
                                            canary=served.canary and f"{served.canary[0]} at {served.canary[1]:g}%"))

    def look():  # what a server of adapters watches: new versions, and stage moves, are served without a reload
        return [(v.version, tuple(v.stages)) for v in registry.versions(root)]

    def drop(version: str, reason: str) -> None:
        registry.drop(root, "canary", f"automatic rollback of {version}: {reason}")

    store = Store(database_url(root))  # an unusable feedback database stops here, before the model loads
    served = load()  # a bad model or an unknown version stops here, with its reason
    app = create_app(settings, served, callers, store, reload=load, on_change=on_change, look=look, drop=drop)
    print(f"serving {served.label} at {settings.url} (OpenAI-compatible; Authorization: Bearer <key>)", flush=True)
    try:
        http_server.run(app, settings.host, settings.port, settings.read_timeout_s)
    finally:
        servers.forget(root, settings.port, forkserver.own_pid())
    return 0


def _adapters(settings, now):
    """What a server of adapters serves: the catalog's versions on its base, on `now`'s engine if the base is the
    same (loading the new adapters into it), else on a new engine."""
    from llmops.serving import adapter_catalog
    from llmops.serving.engine import Engine
    from llmops.serving.multilora import AdapterError
    from llmops.serving.runtime import Served

    root = settings.root
    try:
        catalog = adapter_catalog.plan(root, settings.ref, settings.max_adapters)
        follows = catalog.follows
        if now is not None and now.engine.lora is not None and now.base_id == catalog.base_id:
            engine = now.engine
        else:
            engine = Engine(adapter_catalog.base_dir(root, catalog), adapters=True,
                            tokenizer_dir=adapter_catalog.adapter_dir(root, follows),  # its chat template
                            **settings.engine_options)
        refused = dict(catalog.refused)
        served = []
        for version in catalog.served:
            try:
                if version.version not in engine.lora.names:
                    engine.lora.load(version.version, adapter_catalog.adapter_dir(root, version))
                served.append(version.version)
            except (AdapterError, adapter_catalog.CatalogError) as exc:
                if version.version == follows.version:
                    raise
                refused[version.version] = str(exc)  # the others are served all the same
    except adapter_catalog.CatalogError as exc:
        raise LlmopsError(str(exc)) from None
    held = catalog.canary
    canary = (held.version.version, held.share) if held and held.version.version in served else None
    if held and canary is None:
        print(f"canary {held.version.version} is not served: {refused.get(held.version.version)}", flush=True)
    return Served(engine, registry.ARTIFACT, follows.version, tuple(served), refused, catalog.base_id, canary)


def _deploy_key(root: Path) -> dict[str, str]:
    """The project's deploy key (hash -> name), when it has one: a server started by hand accepts it as a deployed
    one does, so the README's examples and the monitor's probes (which call with it) work against either."""
    from llmops.serving.deploy import DEPLOY_KEY_NAME, KEY_FILE

    path = root / KEY_FILE
    return {apikeys.hash_key(path.read_text().strip()): DEPLOY_KEY_NAME} if path.is_file() else {}


def _params(root: Path):
    from llmops.core.config import ConfigError, load_params

    try:
        return load_params(root / PARAMS_FILE)
    except ConfigError as exc:
        raise LlmopsError(str(exc)) from None


def _resolve(root: Path, ref: str) -> str:
    made = registry.unaudited(root)
    if made:  # a hand-made tag can move production to any commit: nothing is served from such a registry
        raise LlmopsError(f"the registry holds tags made outside llmops ({', '.join(made)}; no audit record names "
                          "them): delete them (`git tag -d TAG`) and change the registry with `llmops registry`; if "
                          "the storage remote moved, its audit/ records must move with it")
    try:
        return registry.resolve(root, ref).version
    except registry.RegistryError as exc:
        hint = ("; promote one (`llmops registry promote vN --to production --why ...`) or pass --model DIR"
                if ref in registry.STAGES else "")
        raise LlmopsError(f"{exc}{hint}") from None
