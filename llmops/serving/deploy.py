"""The deploy step: a registered version goes to staging, answers a smoke request on a server of its own, and only
then becomes production, served by the project's local server (reloaded without dropping requests, or started).

A candidate that fails its smoke request never reaches production: the registry's production
version and the server answering for it are not touched, and the reason is the error's message.
The smoke request goes through the official `openai` client, as a user's would.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from llmops.core.config import DeployParams
from llmops.core.errors import LlmopsError
from llmops.core.fs import write_text
from llmops.governance import audit
from llmops.governance.apikeys import hash_key, new_key
from llmops.registry import versions as registry
from llmops.serving import instances as servers

DEPLOY_USER = "llmops-deploy"
KEY_FILE = servers.SERVE_DIR / "api_key"  # the key the deploy step (and the README's examples) call with


class DeployError(LlmopsError):
    """The version was not deployed; production is as it was."""


class Deployed(BaseModel):
    version: str
    previous: str | None  # the production version before, if it changed
    url: str  # where it serves; for deploy.target vllm, the manifest written (file://...)
    model: str
    prompt: str
    answer: str


DEPLOY_KEY_NAME = "deploy"  # the project key's identity in the access policy: key:deploy


def project_key(root: Path) -> str:
    """This project's deploy key (made once, readable by its owner only); the local server accepts it."""
    path = root / KEY_FILE
    if not path.is_file():
        write_text(path, new_key() + "\n", private=True)
    return path.read_text().strip()


def smoke(url: str, key: str, params: DeployParams) -> str:
    """Ask the smoke prompt through the openai client; return the answer, or raise DeployError saying what was wrong."""
    from openai import OpenAI, OpenAIError

    client = OpenAI(base_url=url, api_key=key, max_retries=1, timeout=params.timeout_s)
    try:
        reply = client.chat.completions.create(
            model=registry.ARTIFACT, messages=[{"role": "user", "content": params.smoke_prompt}], temperature=0,
            max_tokens=params.smoke_max_tokens, user=DEPLOY_USER)  # not traffic: the monitor leaves it out
    except OpenAIError as exc:
        raise DeployError(f"the smoke request to {url} failed: {exc}") from None
    answer = reply.choices[0].message.content or ""
    if not answer.strip():
        raise DeployError(f"the smoke request {params.smoke_prompt!r} got an empty answer")
    if params.smoke_expect is not None and params.smoke_expect not in answer:
        raise DeployError(f"the smoke answer {answer!r} to {params.smoke_prompt!r} does not contain "
                          f"{params.smoke_expect!r} (deploy.smoke_expect)")
    return answer


def deploy(root: Path, version: str, params: DeployParams, source: str) -> Deployed | None:
    """Deploy `version` as params say (None when deploy.target is none); `source` (a flow run) goes in the stage history.

    Audited: the outcome, and where it serves.

    Raises:
        DeployError, ServerError or RegistryError: it was not deployed; production is unchanged.
    """
    if params.target == "none":
        return None
    with audit.recorded(root, "deploy", registry.ARTIFACT, version, allow=("deploy", "stage:production"),
                        target=params.target, source=source) as note:
        deployed = (_deploy_vllm if params.target == "vllm" else _deploy)(root, version, params, source)
        note.update(url=deployed.url, previous=deployed.previous)
    return deployed


def check_target(root: Path, params: DeployParams) -> servers.Server | None:
    """Refuse a deployment whose port is taken (by another program, or by a server of this project that does not
    follow production); returns the production server already on it, if any. A run checks it before its first stage:
    found after training, a busy port cost the whole run.

    Raises:
        DeployError: naming the port and what to do.
    """
    if params.target != "local":
        return None
    live = servers.on_port(root, params.port)
    if live is None and servers.port_in_use(params.host, params.port):
        raise DeployError(f"{params.host}:{params.port} is in use by another program; stop it or set deploy.port")
    if live is not None and live.ref != "production":
        raise DeployError(f"the server at {live.url} serves {live.ref}, not production; stop it "
                          f"(`llmops serve stop --port {params.port}`) or set deploy.port")
    return live


def _deploy(root: Path, version: str, params: DeployParams, source: str) -> Deployed:
    key = project_key(root)
    live = check_target(root, params)
    before = registry.holder(root, "production")
    changed = before is not None and before.version != version
    if before is None or changed:
        _smoke_candidate(root, version, params, key, f"deploy candidate from {source}", before)
        registry.promote(root, version, "production", f"passed its smoke test in {source}", purpose="deploy")
    try:
        if live is None:
            live = servers.start(root, "production", params.host, params.port, params.max_concurrency,
                                 params.timeout_s, [f"{hash_key(key)}:{DEPLOY_KEY_NAME}"], params.adapters)
        elif live.version != version:
            live = servers.reload(root, live, params.timeout_s)
        answer = smoke(live.url, key, params)
    except LlmopsError as exc:
        if not changed:
            raise DeployError(f"the production server could not serve {version}: {exc}") from None
        registry.rollback(root, "production", f"deploying {version} failed: {exc}",  # the server follows it back
                          purpose="deploy")
        if live is not None:
            servers.reload(root, live, params.timeout_s)
        raise DeployError(f"{version} passed its smoke test but failed on the production server, so production is "
                          f"back on {before.version}: {exc}") from None
    return Deployed(version=version, previous=before.version if changed else None, url=live.url,
                    model=registry.ARTIFACT, prompt=params.smoke_prompt, answer=answer)


def _deploy_vllm(root: Path, version: str, params: DeployParams, source: str) -> Deployed:
    """The cluster manifests for vLLM are rendered and validated (deploy.vllm; a refusal leaves production as it
    was), the candidate answers its smoke request on our server here, takes production, and the manifests are
    written."""
    from llmops.core.config import PARAMS_FILE, load_params
    from llmops.serving import vllm_manifests

    everything = load_params(root / PARAMS_FILE)  # the manifests need the storage and registry sections too
    try:  # everything the manifests need is checked before production moves
        objects = vllm_manifests.render(root, everything, production=registry.get(root, version))
    except vllm_manifests.ManifestError as exc:
        raise DeployError(f"no vLLM manifests for {version}, so production is unchanged: {exc}") from None
    before = registry.holder(root, "production")
    changed = before is None or before.version != version
    key = project_key(root)
    answer = _smoke_candidate(root, version, params, key, f"deploy candidate from {source}", before)
    if changed:
        registry.promote(root, version, "production", f"passed its smoke test in {source}", purpose="deploy")
    path = vllm_manifests.write(root, everything, objects=objects)
    return Deployed(version=version, previous=before.version if before and changed else None,
                    url=path.resolve().as_uri(), model=registry.ARTIFACT, prompt=params.smoke_prompt, answer=answer)


def _smoke_candidate(root: Path, version: str, params: DeployParams, key: str, why: str,
                     production: registry.Version | None) -> str:
    """Staging, then a smoke request to a server of the candidate's own on a free port (stopped afterwards)."""
    staging = registry.holder(root, "staging")
    if staging is None or staging.version != version:
        registry.promote(root, version, "staging", why, purpose="deploy")
    stays = (f"production stays on {production.version}" if production else "production stays empty")
    try:
        candidate = servers.start(root, version, params.host, servers.free_port(params.host), params.max_concurrency,
                                  params.timeout_s, [f"{hash_key(key)}:{DEPLOY_KEY_NAME}"])
    except servers.ServerError as exc:
        raise DeployError(f"{version} could not be served, so {stays}: {exc}") from None
    try:
        return smoke(candidate.url, key, params)
    except DeployError as exc:
        raise DeployError(f"{version} failed its smoke test, so {stays}: {exc}") from None
    finally:
        servers.stop(root, candidate)


def summary(deployed: Deployed) -> str:
    """What the user needs to call the served model."""
    key = f"$(cat {KEY_FILE})"
    changed = f" (was {deployed.previous})" if deployed.previous else ""
    if deployed.url.startswith("file://"):
        manifest = deployed.url.removeprefix("file://")
        return "\n".join([
            f"Deployed {registry.ARTIFACT} {deployed.version} to production{changed}: vLLM manifests in {manifest}",
            f"  asked {deployed.prompt!r} here, it answered {deployed.answer!r}",
            f"  on the cluster: kubectl apply -f {manifest} (docs/serving.md: The production engine path)",
        ])
    body = ('{"model": "' + deployed.model + '", "temperature": 0, "messages": [{"role": "user", "content": '
            + _json_str(deployed.prompt) + '}]}')
    return "\n".join([
        f"Deployed {registry.ARTIFACT} {deployed.version} to production{changed}, served at {deployed.url}",
        f"  asked {deployed.prompt!r}, it answered {deployed.answer!r}",
        f"  call it with the key in {KEY_FILE} (or your own: `llmops serve keygen NAME`):",
        f"    curl {deployed.url}/chat/completions -H \"Authorization: Bearer {key}\" "
        f"-H 'Content-Type: application/json' -d '{body}'",
        f"    python -c 'from openai import OpenAI; c = OpenAI(base_url=\"{deployed.url}\", "
        f"api_key=open(\"{KEY_FILE}\").read().strip()); print(c.chat.completions.create(model=\"{deployed.model}\", temperature=0, "
        f"messages=[{{\"role\": \"user\", \"content\": {_json_str(deployed.prompt)}}}]).choices[0].message.content)'",
        "  `llmops serve status` shows it, `llmops serve stop` stops it",
    ])


def _json_str(text: str) -> str:
    import json

    return json.dumps(text).replace("'", "'\\''")  # inside a single-quoted shell argument
