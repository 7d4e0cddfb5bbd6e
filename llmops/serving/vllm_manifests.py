"""The production engine path: vLLM on a Kubernetes cluster, serving production's base with the LoRA adapters.

`write()` renders, for the registry's production version (and its canary), either a plain
Kubernetes Deployment and Service, or a KServe InferenceService whose canary takes the canary's
share of the traffic, and validates every object against the Kubernetes schemas
(kubernetes-validate) before a file is written. Our own server is not in the picture: vLLM runs
from its own image (its FastAPI pin conflicts with Prefect's, so it cannot share our environment).

- Model files: an init container fetches them with `dvc get` from the registry's git remote at
  each version's commit (the base once, then each adapter), from the project's S3 remote, with
  credentials from a Secret (`deploy.vllm.storage_secret`, envFrom: AWS_ACCESS_KEY_ID, ...).
  A local DVC remote or no registry.git_remote cannot be reached from a cluster: refused.
- vLLM serves the base with `--enable-lora`; each version is a LoRA module named as our server
  names it (`model@v3.0.0`), and `model` is production's adapter, so clients ask the same names.
- The API key comes from a Secret (`deploy.vllm.api_key_secret`, key `api-key`) as VLLM_API_KEY.
  (vLLM leaves /metrics open: keep the Service inside the cluster.)
- Prompt-tuning versions are refused: vLLM's V1 engine dropped prompt adapters.
- KServe canary: the InferenceService describes the newest revision; with a canary it is the
  canary's configuration with `canaryTrafficPercent` = its share, and KServe keeps the last ready
  revision (production) for the rest. `canary promote` writes it without the percent; `canary drop`
  writes production's. The plain Deployment has no traffic split: it serves production (the
  canary's adapter is loaded too, asked for by name).
"""

from __future__ import annotations

import io
import json
import os
import re
import shlex
from pathlib import Path

from llmops.core import git
from llmops.core.config import Params
from llmops.core.errors import LlmopsError
from llmops.core.fs import write_text
from llmops.registry import versions as registry
from llmops.serving import adapter_catalog

PORT = 8000
MODELS = "/models"
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the --max-lora-rank values vLLM accepts


class ManifestError(LlmopsError):
    """No manifest can be written for this registry state or these params; nothing was written."""


def _git_url(root: Path, params: Params) -> str:
    remote = params.registry.git_remote
    if remote is None:
        raise ManifestError("registry.git_remote is not set: the cluster fetches each version from the registry's git "
                            "remote (`dvc get URL PATH --rev COMMIT`); set it (e.g. origin) and push the registry")
    url = git.answer(root, "remote", "get-url", remote)
    if url is None:
        raise ManifestError(f"registry.git_remote: this clone has no git remote {remote!r}")
    return url


def _served(version: registry.Version) -> None:
    if not version.lineage.get("adapter"):
        raise ManifestError(f"{version.version} has no LoRA adapter: vLLM serves LoRA adapters on a base, and dropped "
                            "prompt adapters (a prompt-tuning version cannot be served there; serve it with `llmops "
                            "serve`), or it was released before releases kept their adapter")


def _fetch_script(git_url: str, base: dict, base_commit: str, adapters: list[registry.Version]) -> str:
    lines = ["set -eu", "pip install --quiet --no-cache-dir 'dvc[s3]>=3.50,<4'"]
    if "path" in base:
        lines.append(f"dvc get {shlex.quote(git_url)} {shlex.quote(base['path'])} --rev {base_commit} "
                     f"-o {MODELS}/base")
    for v in adapters:
        lines.append(f"dvc get {shlex.quote(git_url)} {registry.RELEASE}/{v.lineage['adapter']} --rev {v.commit} "
                     f"-o {MODELS}/adapters/{v.version}")
    return "\n".join(lines)


def _rank(root: Path, version: registry.Version) -> int:
    """The LoRA rank of a version's adapter (its adapter_config.json, read through DVC at its commit)."""
    import dvc.api

    path = f"{registry.RELEASE}/{version.lineage['adapter']}/adapter_config.json"
    try:
        return int(json.loads(dvc.api.read(path, repo=str(root), rev=version.commit))["r"])
    except Exception as exc:  # DVC's own errors: an unreachable remote, files never pushed
        raise ManifestError(f"{version.version}: {path} cannot be read from the DVC cache or remote: "
                            f"{type(exc).__name__}: {exc}") from None


def _pod_spec(params: Params, git_url: str, alias: registry.Version, served: list[registry.Version],
              rank: int) -> dict:
    """vLLM on the base of `served` (one base), each version a LoRA module, and `model` the alias's adapter."""
    vllm = params.deploy.vllm
    base = adapter_catalog.base_identity(alias)
    modules = [f"{registry.ARTIFACT}={MODELS}/adapters/{alias.version}"] + [
        f"{registry.ARTIFACT}@{v.version}={MODELS}/adapters/{v.version}" for v in served]
    args = ["--model", base.get("hub_id") or f"{MODELS}/base", "--served-model-name", f"{registry.ARTIFACT}-base",
            "--enable-lora", "--max-loras", str(len(modules)), "--max-lora-rank", str(rank),
            "--lora-modules", *modules, "--port", str(PORT)]
    storage_env = [{"secretRef": {"name": vllm.storage_secret}}]
    mount = [{"name": "models", "mountPath": MODELS}]
    return {
        "initContainers": [{
            "name": "fetch-models", "image": vllm.fetch_image,
            "command": ["sh", "-c", _fetch_script(git_url, base, alias.commit, served)],
            "envFrom": storage_env, "volumeMounts": mount,
        }],
        "containers": [{
            "name": "vllm", "image": vllm.image, "args": args,
            "ports": [{"containerPort": PORT, "name": "http"}],
            "env": [{"name": "VLLM_API_KEY", "valueFrom": {"secretKeyRef": {"name": vllm.api_key_secret,
                                                                             "key": "api-key"}}}],
            # the storage credentials stay in the init container; a base on the hub may need HF_TOKEN: then vLLM
            # reads the same Secret
            **({"envFrom": storage_env} if "hub_id" in base else {}),
            "resources": {"limits": {"nvidia.com/gpu": vllm.gpus}, "requests": {"nvidia.com/gpu": vllm.gpus}},
            "readinessProbe": {"httpGet": {"path": "/health", "port": PORT}, "periodSeconds": 10},
            "volumeMounts": mount,
        }],
        "volumes": [{"name": "models", "emptyDir": {}}],
    }


def render(root: str | os.PathLike, params: Params, production: registry.Version | None = None) -> list[dict]:
    """The objects for production (`production`, or the registry's holder) and its canary, in `deploy.vllm.format`,
    validated.

    Raises:
        ManifestError: no production version, a version without a LoRA adapter, a canary on another base, no
            registry git remote, a local DVC remote, or an object the Kubernetes schemas refuse.
    """
    root = Path(root)
    if params.storage.remote != "s3":
        raise ManifestError("storage.remote is local: a cluster cannot read this machine's DVC remote; push to S3 "
                            "(storage.remote: s3) so that the init container can `dvc get` the models")
    try:
        known = registry.versions(root)
        production = production or registry.holder(root, "production", known)
        canary = registry.canary(root, known)
    except registry.RegistryError as exc:
        raise ManifestError(str(exc)) from None
    if production is None:
        raise ManifestError("no version holds production; promote one first")
    _served(production)
    served = [production]
    if canary is not None and canary.version.version == production.version:
        canary = None  # the canary is what takes production now
    if canary is not None:
        _served(canary.version)
        if adapter_catalog.base_identity(canary.version) != adapter_catalog.base_identity(production):
            raise ManifestError(f"canary {canary.version.version} is built on another base than production "
                                f"{production.version}; one vLLM deployment serves one base")
        served.append(canary.version)
    git_url = _git_url(root, params)
    # vLLM sizes its LoRA buffers by --max-lora-rank, one of a few values
    need = max(_rank(root, v) for v in served)
    rank = next((r for r in VLLM_RANKS if r >= need), None)
    if rank is None:
        raise ManifestError(f"LoRA rank {need} is over vLLM's largest --max-lora-rank ({VLLM_RANKS[-1]})")
    vllm = params.deploy.vllm
    meta = {"name": vllm.name, "labels": {"app.kubernetes.io/name": vllm.name,
                                          "app.kubernetes.io/managed-by": "llmops"},
            "annotations": {"llmops/production": production.version}}
    if vllm.namespace:
        meta["namespace"] = vllm.namespace
    if vllm.format == "kserve":
        # the newest revision: with a canary, `model` is the canary's adapter there, at its share of the traffic
        alias = production if canary is None else canary.version
        predictor = {"minReplicas": vllm.replicas, **_pod_spec(params, git_url, alias, served, rank)}
        if canary is not None:
            predictor["canaryTrafficPercent"] = round(canary.share)
            meta["annotations"]["llmops/canary"] = f"{canary.version.version} at {canary.share:g}%"
        objects = [{"apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService", "metadata": meta,
                    "spec": {"predictor": predictor}}]
    else:
        selector = {"app.kubernetes.io/name": vllm.name}
        objects = [
            {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta,
             "spec": {"replicas": vllm.replicas, "selector": {"matchLabels": selector},
                      "template": {"metadata": {"labels": selector},
                                   "spec": _pod_spec(params, git_url, production, served, rank)}}},
            {"apiVersion": "v1", "kind": "Service", "metadata": {k: v for k, v in meta.items() if k != "annotations"},
             "spec": {"selector": selector, "ports": [{"name": "http", "port": PORT, "targetPort": PORT}]}},
        ]
    for obj in objects:
        validate(obj, vllm.kubernetes_version)
    return objects


def validate(obj: dict, kubernetes_version: str) -> None:
    """Check `obj` against the Kubernetes schemas of that version; an InferenceService (a CRD, which the schemas do
    not hold) is checked through its predictor, a pod spec, as the Pod it becomes.

    Raises:
        ManifestError: what the schema refuses, and where.
    """
    import kubernetes_validate

    if obj["kind"] == "InferenceService":
        spec = dict(obj["spec"]["predictor"])
        for extension in ("minReplicas", "maxReplicas", "canaryTrafficPercent"):
            value = spec.pop(extension, None)
            if value is not None and not (isinstance(value, int) and value >= 0):
                raise ManifestError(f"InferenceService {obj['metadata']['name']}: {extension} {value!r} is not a "
                                    "non-negative integer")
        if not 0 <= obj["spec"]["predictor"].get("canaryTrafficPercent", 0) <= 100:
            raise ManifestError("InferenceService: canaryTrafficPercent outside 0-100")
        obj = {"apiVersion": "v1", "kind": "Pod", "metadata": obj["metadata"], "spec": spec}
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", obj["metadata"]["name"]) or len(obj["metadata"]["name"]) > 63:
        raise ManifestError(f"{obj['kind']} name {obj['metadata']['name']!r} is not a DNS-1123 label")
    try:
        kubernetes_validate.validate(obj, kubernetes_version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        where = ".".join(str(p) for p in exc.path)
        raise ManifestError(f"{obj['kind']} {obj['metadata']['name']}: {where}: {exc.message}") from None


def write(root: str | os.PathLike, params: Params, out: str | os.PathLike | None = None,
          objects: list[dict] | None = None) -> Path:
    """Write `objects` (default: render()) to `<out>/<format>.yaml` (default deploy.vllm.out), atomically; returns
    the file. Nothing is written if any object is refused."""
    from ruamel.yaml import YAML

    objects = objects if objects is not None else render(root, params)
    target = Path(root) / (out or params.deploy.vllm.out) / f"{params.deploy.vllm.format}.yaml"
    yaml = YAML()
    yaml.width = 4096
    text = io.StringIO()
    text.write("# written by llmops (llmops/serving/vllm_manifests.py) for the registry's production version; "
               "kubectl apply -f this file\n")
    yaml.dump_all(objects, text)
    write_text(target, text.getvalue())
    return target
