"""The production engine path: Kubernetes / KServe manifests for vLLM, checked against the Kubernetes schemas."""

from __future__ import annotations

import subprocess

import pytest
import yaml

from conftest import BIN, run, set_params, stop_servers

# the tests that register versions of the trained pipeline (and start a server) carry both markers


def _objects(path):
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


@pytest.mark.services
@pytest.mark.training
def test_kserve_and_kubernetes_manifests_serve_production_and_its_canary(versioned_project, s3_endpoint, bucket):
    """v1 in production, v2 its canary: the manifests in both formats; then `deploy.target: vllm` deploys v2."""
    import kubernetes_validate

    from llmops.serving import deploy
    from llmops.registry import versions as registry
    from llmops.core.config import load_params

    project = versioned_project
    origin = project.parent / "origin.git"
    subprocess.run(["git", "init", "-q", "--bare", str(origin)], check=True)
    run(["git", "remote", "add", "origin", str(origin)], project)
    llmops = [str(BIN / "llmops")]
    bad = run(llmops + ["serve", "manifests"], project, check=False)
    assert bad.returncode == 1 and "storage.remote is local: a cluster cannot read this machine's DVC remote" in bad.stderr
    set_params(project, "storage.remote=s3", f"storage.bucket={bucket}", f"storage.endpoint_url={s3_endpoint}")
    bad = run(llmops + ["serve", "manifests"], project, check=False)
    assert bad.returncode == 1 and "registry.git_remote is not set" in bad.stderr
    set_params(project, "registry.git_remote=origin")

    out = run(llmops + ["serve", "manifests"], project).stdout
    path = project / "deployments/vllm/kserve.yaml"
    assert f"wrote {path}" in out
    [isvc] = _objects(path)
    assert isvc["kind"] == "InferenceService" and "canaryTrafficPercent" not in isvc["spec"]["predictor"]
    pod = isvc["spec"]["predictor"]
    vllm = pod["containers"][0]
    assert vllm["image"].startswith("vllm/vllm-openai:")
    args = vllm["args"]
    assert args[args.index("--model") + 1] == "/models/base" and "--enable-lora" in args
    modules = args[args.index("--lora-modules") + 1:args.index("--port")]
    assert modules == ["model=/models/adapters/v1.0.0", "model@v1.0.0=/models/adapters/v1.0.0"]
    assert args[args.index("--max-lora-rank") + 1] == "8"  # the tests' adapters are r=4: vLLM's next size
    assert vllm["env"] == [{"name": "VLLM_API_KEY", "valueFrom": {"secretKeyRef": {"name": "llmops-api-key",
                                                                                   "key": "api-key"}}}]
    commit = run(["git", "rev-list", "-n1", "model@v1.0.0"], project).stdout.strip()
    script = pod["initContainers"][0]["command"][2]
    assert f"dvc get {origin} models/pretrain --rev {commit} -o /models/base" in script
    assert f"dvc get {origin} models/release/adapter --rev {commit} -o /models/adapters/v1.0.0" in script
    key = (project / ".llmops/serve/api_key").read_text().strip() if (project / ".llmops/serve/api_key").exists() else None
    assert key is None or key not in path.read_text()  # the key comes from a Secret, never the manifest

    run(llmops + ["registry", "canary", "v2", "--share", "10", "--why", "try"], project)
    run(llmops + ["serve", "manifests"], project)
    [isvc] = _objects(path)
    pod = isvc["spec"]["predictor"]
    assert pod["canaryTrafficPercent"] == 10 and isvc["metadata"]["annotations"]["llmops/canary"] == "v2.0.0 at 10%"
    args = pod["containers"][0]["args"]
    assert args[args.index("--lora-modules") + 1:args.index("--port")] == [  # the new revision: model is the canary
        "model=/models/adapters/v2.0.0", "model@v1.0.0=/models/adapters/v1.0.0", "model@v2.0.0=/models/adapters/v2.0.0"]

    set_params(project, "deploy.vllm.format=kubernetes", "deploy.vllm.namespace=ml")
    run(llmops + ["serve", "manifests", "--out", "k8s"], project)
    deployment, service = _objects(project / "k8s/kubernetes.yaml")
    for obj in (deployment, service):  # checked again here, independently of the writer
        kubernetes_validate.validate(obj, "1.33.0", strict=True)
    assert deployment["kind"] == "Deployment" and service["kind"] == "Service"
    assert deployment["metadata"]["namespace"] == service["metadata"]["namespace"] == "ml"
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "model=/models/adapters/v1.0.0" in args and "model@v2.0.0=/models/adapters/v2.0.0" in args  # no split here
    run(llmops + ["registry", "canary", "drop", "--why", "done"], project)

    # the deploy step with target vllm: a smoke test on our server here, production moves, the manifest is written
    set_params(project, "deploy.vllm.format=kserve", "deploy.target=vllm")
    try:
        done = deploy.deploy(project, "v2.0.0", load_params(project / "params.yaml").deploy, "a test")
    finally:
        stop_servers(project)
    assert done.previous == "v1.0.0" and registry.holder(project, "production").version == "v2.0.0"
    assert done.url.endswith("deployments/vllm/kserve.yaml") and done.answer
    assert "kubectl apply -f" in deploy.summary(done)
    [isvc] = _objects(project / "deployments/vllm/kserve.yaml")
    assert isvc["metadata"]["annotations"]["llmops/production"] == "v2.0.0"


def test_a_manifest_the_schema_refuses_names_the_field():
    from llmops.serving.vllm_manifests import ManifestError, validate

    deployment = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "m"},
                  "spec": {"replicas": "two", "selector": {"matchLabels": {"a": "b"}},
                           "template": {"metadata": {"labels": {"a": "b"}}, "spec": {"containers": []}}}}
    with pytest.raises(ManifestError, match="Deployment m: spec.replicas: 'two' is not of type 'integer'"):
        validate(deployment, "1.33.0")
    isvc = {"apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService", "metadata": {"name": "m"},
            "spec": {"predictor": {"canaryTrafficPercent": 10, "containers": [{"name": "v", "image": "i",
                                                                               "ports": [{"containerPort": "80"}]}]}}}
    with pytest.raises(ManifestError, match="Pod m: spec.containers.0.ports.0.containerPort"):
        validate(isvc, "1.33.0")
    with pytest.raises(ManifestError, match="not a DNS-1123 label"):
        validate({**deployment, "metadata": {"name": "Model_1"}}, "1.33.0")


def test_a_version_without_a_lora_adapter_is_refused_for_vllm():
    from llmops.registry import versions as registry
    from llmops.serving.vllm_manifests import ManifestError, _served

    prompt_tuned = registry.Version("v9.0.0", "0" * 40, "", "", {"lineage": {"variant": "quantized/nf4",
                                                                             "adapter": None}})
    with pytest.raises(ManifestError, match="v9.0.0 has no LoRA adapter: vLLM .* dropped prompt adapters"):
        _served(prompt_tuned)
