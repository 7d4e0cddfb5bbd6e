"""Governance: the hash-chained audit trail (local and S3), its anchors and its races; roles and the access policy."""

from __future__ import annotations

import json
import multiprocessing
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import BIN, base_env, run, set_params
from llmops.governance import access
from llmops.governance import audit
from llmops.governance import identity
from llmops.registry import versions as registry

ROLES = ("viewer", "operator", "approver", "admin")


def _trail(project: Path) -> Path:
    return project.parent / "remote" / "audit"


def _append(project: Path, n: int) -> list[audit.Record]:
    return [audit.append(project, "registry.promote", "model", f"v{i}.0.0", detail={"why": f"step {i}"})
            for i in range(1, n + 1)]


def _verify(project: Path) -> subprocess.CompletedProcess:
    return run([str(BIN / "llmops"), "trail", "verify"], project, check=False)


def test_records_chain_and_verify(project):
    records = _append(project, 3)
    assert [r.seq for r in records] == [1, 2, 3]
    assert records[0].prev == "" and records[1].prev == records[0].hash and records[2].prev == records[1].hash
    assert all(r.hash == audit.digest(r.body()) for r in records)
    stored = json.loads((_trail(project) / "000000000002.json").read_text())
    assert stored["who"] and stored["action"] == "registry.promote" and stored["version"] == "v2.0.0"
    assert audit.anchors(project) == {r.seq: r.hash for r in records}  # one annotated tag audit/<trail>/<n> each
    ok = _verify(project)
    assert ok.returncode == 0 and f"intact: 3 records, head {records[-1].hash}" in ok.stdout
    log = run([str(BIN / "llmops"), "trail", "log", "--json"], project).stdout.splitlines()
    assert [json.loads(line)["seq"] for line in log] == [1, 2, 3]


@pytest.mark.parametrize("tamper, expected", [
    ("change", "record 2 was changed after it was written"),
    ("remove", "record 2 removed (the chain jumps from 1 to 3)"),
    ("reorder", "record 2 holds the contents of record 3 (records were reordered)"),
    ("cut", "record 4 is anchored (tag audit/{trail}/4) but the trail ends at 3: records were cut off the end"),
    ("rewrite", "record 2 differs from its anchor (tag audit/{trail}/2): the chain was rewritten from there"),
])
def test_verify_pinpoints_tampering(project, tamper, expected):
    _append(project, 4)
    trail = _trail(project)
    path = {n: trail / f"{n:012d}.json" for n in range(1, 5)}
    if tamper == "change":
        record = json.loads(path[2].read_text())
        record["who"] = "mallory"
        path[2].write_text(json.dumps(record))
    elif tamper == "remove":
        path[2].unlink()
    elif tamper == "reorder":
        two, three = path[2].read_text(), path[3].read_text()
        path[2].write_text(three)
        path[3].write_text(two)
    elif tamper == "cut":
        path[4].unlink()
    else:  # a writer who rewrites record 2 and recomputes every hash after it: only the anchors catch it
        prev = json.loads(path[1].read_text())["hash"]
        for n in (2, 3, 4):
            record = json.loads(path[n].read_text())
            record.update(prev=prev, who="mallory" if n == 2 else record["who"])
            record["hash"] = audit.digest({k: v for k, v in record.items() if k != "hash"})
            path[n].write_text(json.dumps(record))
            prev = record["hash"]
    before = {p.name: p.read_bytes() for p in trail.iterdir()}
    result = _verify(project)
    assert result.returncode == 3
    name = audit._trail(audit._store(audit._params(project).storage, project))
    assert "audit trail TAMPERED" in result.stderr and expected.format(trail=name) in result.stderr, result.stderr
    assert {p.name: p.read_bytes() for p in trail.iterdir()} == before  # verify changes nothing


def _tags(project: Path, *args: str) -> list[str]:
    return run(["git", "tag", "-l", "audit/*", *args], project).stdout.split()


@pytest.mark.parametrize("tamper, expected", [
    # the anchors of this checkout's records deleted with the trail's tail: nothing left here to compare with
    ("anchors", "record 3 has no anchor (tag audit/{trail}/3 was deleted)"),
    # with the registry's git remote: the shared repository's anchors stand
    ("cut", "record 4 is anchored (tag audit/{trail}/4) but the trail ends at 3: records were cut off the end"),
    ("rewrite", "record 2's anchor here differs from the one on"),
])
def test_verify_checks_against_the_shared_anchors(project, tmp_path, tamper, expected):
    """An insider who holds this clone can delete its tags or move them; not the shared repository's."""
    bare = tmp_path / "shared.git"
    run(["git", "init", "-q", "--bare", str(bare)], tmp_path)
    if tamper != "anchors":
        set_params(project, f"registry.git_remote={bare}")
    records = _append(project, 4)
    trail, name = _trail(project), audit._trail(audit._store(audit._params(project).storage, project))
    if tamper == "anchors":
        run(["git", "tag", "-d", f"audit/{name}/3"], project)
    elif tamper == "cut":  # the last record and its tag here
        (trail / f"{4:012d}.json").unlink()
        run(["git", "tag", "-d", f"audit/{name}/4"], project)
    else:  # rewrite from record 2 with every hash recomputed, and this clone's tags moved to match
        prev = records[0].hash
        for n in (2, 3, 4):
            path = trail / f"{n:012d}.json"
            record = json.loads(path.read_text())
            record.update(prev=prev, who="mallory" if n == 2 else record["who"])
            record["hash"] = audit.digest({k: v for k, v in record.items() if k != "hash"})
            path.write_text(json.dumps(record))
            prev = record["hash"]
            run(["git", "tag", "-f", "-a", f"audit/{name}/{n}", "-m", f"sha256:{record['hash']}"], project)
    result = _verify(project)
    assert result.returncode == 3 and expected.format(trail=name) in result.stderr, result.stderr


def test_each_record_names_the_checkout_that_wrote_it(project):
    import socket

    [record] = _append(project, 1)
    assert record.detail["where"] == f"{socket.gethostname()}:{project.resolve()}"


def _race(project: str, writer: int, n: int) -> None:
    for i in range(n):
        audit.append(project, "stage.train", "train", detail={"writer": writer, "i": i})


def test_concurrent_writers_never_fork_or_lose_the_chain(project):
    writers, each = 4, 15
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_race, args=(str(project), w, each)) for w in range(writers)]
    [p.start() for p in procs]
    [p.join(120) for p in procs]
    assert all(p.exitcode == 0 for p in procs)
    records = list(audit.records(project))
    assert [r.seq for r in records] == list(range(1, writers * each + 1))  # no gap, no duplicate number
    assert sorted((r.detail["writer"], r.detail["i"]) for r in records) == [(w, i) for w in range(writers)
                                                                              for i in range(each)]  # none lost
    assert audit.verify(project).ok
    assert not list(_trail(project).glob(".*.tmp"))


@pytest.mark.services
def test_trail_on_s3_with_object_lock(project, s3_endpoint):
    import boto3
    from botocore.exceptions import ClientError

    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.create_bucket(Bucket="audit-locked", ObjectLockEnabledForBucket=True)
    set_params(project, "storage.remote=s3", "storage.bucket=audit-locked", f"storage.endpoint_url={s3_endpoint}",
               "governance.audit_lock_days=1")
    records = _append(project, 3)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="audit-locked", Prefix="llmops/audit/")["Contents"]]
    assert keys == [f"llmops/audit/{n:012d}.json" for n in (1, 2, 3)]
    head = s3.head_object(Bucket="audit-locked", Key=keys[1])
    assert head["ObjectLockMode"] == "COMPLIANCE"
    version = head.get("VersionId")
    with pytest.raises(ClientError):  # compliance mode: not even the writer can remove a record
        s3.delete_object(Bucket="audit-locked", Key=keys[1], VersionId=version)
    assert _verify(project).returncode == 0
    # a second writer that lost the race for a number is refused by S3 itself, and takes the next
    store = audit._store(audit._params(project).storage, project)
    assert store.create(3, b"{}") is False
    assert audit.append(project, "registry.rollback", "model").seq == 4 and audit.verify(project).ok
    assert records[-1].hash == json.loads(s3.get_object(Bucket="audit-locked", Key=keys[2])["Body"].read())["hash"]


def test_unreachable_trail_storage_is_a_clear_error(project):
    set_params(project, "storage.remote=s3", "storage.bucket=nowhere", "storage.endpoint_url=http://127.0.0.1:9")
    with pytest.raises(audit.AuditError, match="audit trail: cannot list s3://nowhere/llmops/audit/: cannot reach"):
        audit.append(project, "registry.promote", "model")
    result = _verify(project)
    assert result.returncode == 1 and "error: trail: audit trail: cannot list" in result.stderr


# --- roles ----------------------------------------------------------------------------------------------------------

# every action the policy decides, on an object, and the roles of the shipped policy that may do it
MATRIX = [
    ("run", "pipeline", {"operator", "approver", "admin"}),
    ("register", "registry", {"operator", "approver", "admin"}),
    ("promote", "stage:staging", {"operator", "approver", "admin"}),
    ("promote", "stage:production", {"approver", "admin"}),
    ("promote", "stage:canary", {"approver", "admin"}),  # a canary takes production's traffic
    ("rollback", "stage:canary", {"approver", "admin"}),  # dropping a canary
    ("deploy", "stage:production", {"operator", "approver", "admin"}),
    ("rollback", "stage:production", {"approver", "admin"}),
    ("approve", "stage:production", {"approver", "admin"}),
    ("erase", "data", {"admin"}),
    ("manage", "keys", {"admin"}),
    ("operate", "servers", {"operator", "approver", "admin"}),
    ("review", "feedback", {"approver", "admin"}),
    ("change", "policy", {"admin"}),
    ("call", "model:model", {"admin"}),  # people; keys call as `caller`
    ("read", "registry", {"viewer", "operator", "approver", "admin"}),
]


def _people(project: Path, default: str = "viewer") -> access.Policy:
    """A person per role, as an OS account (`<role>-person`) and as a key of the project (`key:<role>-person`: how
    these tests act as them, with LLMOPS_TOKEN; `_as`)."""
    policy = project / "governance" / "policy.csv"
    policy.write_text(policy.read_text() + "".join(f"g, {role}-person, {role}\ng, key:{role}-person, {role}\n"
                                                   for role in ROLES)
                      + "p, partner, model:model, call\ng, key:partner, partner\n")
    set_params(project, f"governance.default_role={default}")
    return access.load(project)


def _as(project: Path, name: str) -> dict[str, str]:
    """The environment of someone acting with their own key (LLMOPS_TOKEN): the key's hash is written to the project's
    keys file as `llmops serve keygen` writes it (the tests set up, as an insider would)."""
    from llmops.governance import apikeys

    key = f"sk-llmops-test-{name}"
    keys = project / apikeys.DEFAULT_FILE
    keys.parent.mkdir(parents=True, exist_ok=True)
    if f" {name}\n" not in (keys.read_text() if keys.is_file() else ""):
        with open(keys, "a") as fh:
            fh.write(f"{apikeys.hash_key(key)} {name}\n")
    return base_env(LLMOPS_TOKEN=key)


def test_every_action_with_every_role(project):
    policy = _people(project)
    for action, obj, allowed in MATRIX:
        for role in ROLES:
            assert policy.allows(f"{role}-person", action, obj) == (role in allowed), (role, action, obj)
    assert policy.allows("someone-unnamed", "read", "registry") and not policy.allows("someone-unnamed", "run",
                                                                                        "pipeline")
    # keys: the default key role calls every model; a key with a role of its own calls only what it names
    assert policy.allows("key:any", "call", "model:model") and policy.allows("key:any", "call", "model:other")
    assert policy.allows("key:partner", "call", "model:model") and not policy.allows("key:partner", "call",
                                                                                       "model:other")
    assert not policy.allows("key:any", "promote", "stage:production")


def test_denied_actions_are_refused_clearly_and_audited(project):
    _people(project)
    env = _as(project, "operator-person")
    llmops = str(BIN / "llmops")
    refused = run([llmops, "registry", "rollback", "--why", "try"], project, env=env, check=False)
    assert refused.returncode == 1
    assert ("error: registry: key:operator-person (role operator) may not rollback stage:production: the access "
            f"policy {project}/governance/policy.csv gives that to admin, approver") in refused.stderr
    keys = run([llmops, "serve", "keygen", "ci"], project, env=env, check=False)
    assert keys.returncode == 1 and "may not manage keys" in keys.stderr
    assert "ci" not in (project / ".llmops/serve/api_keys").read_text()
    viewer = run([llmops, "run", "--no-push"], project, env=_as(project, "viewer-person"), check=False)
    assert viewer.returncode == 1 and "key:viewer-person (role viewer) may not run pipeline" in viewer.stderr
    denied = [r for r in audit.records(project) if r.outcome == "denied"]
    assert [(r.who, r.action, r.object) for r in denied] == [
        ("key:operator-person", "registry.rollback", "model"), ("key:operator-person", "serve.keygen", "key:ci"),
        ("key:viewer-person", "pipeline.run", "pipeline")]
    assert "may not rollback" in denied[0].detail["error"]


def test_keys_made_and_revoked_by_an_admin_are_audited(project):
    llmops = str(BIN / "llmops")
    _people(project)
    env = _as(project, "admin-person")
    key = run([llmops, "serve", "keygen", "chatbot"], project, env=env).stdout.strip()
    stored = (project / ".llmops/serve/api_keys").read_text()
    assert key.startswith("sk-llmops-") and key not in stored and stored.endswith(" chatbot\n")
    assert run([llmops, "serve", "keys"], project, env=env).stdout == "admin-person\nchatbot\n"
    taken = run([llmops, "serve", "keygen", "chatbot"], project, env=env, check=False)
    assert taken.returncode == 1 and "a key named 'chatbot' exists" in taken.stderr
    run([llmops, "serve", "revoke", "chatbot"], project, env=env)
    assert "chatbot" not in (project / ".llmops/serve/api_keys").read_text()
    unknown = run([llmops, "serve", "revoke", "chatbot"], project, env=env, check=False)
    assert unknown.returncode == 1 and "no key named 'chatbot'" in unknown.stderr
    trail = [(r.who, r.action, r.object, r.outcome) for r in audit.records(project)]
    assert trail == [("key:admin-person", "serve.keygen", "key:chatbot", "ok"),
                     ("key:admin-person", "serve.keygen", "key:chatbot", "failed"),
                     ("key:admin-person", "serve.revoke", "key:chatbot", "ok"),
                     ("key:admin-person", "serve.revoke", "key:chatbot", "failed")]
    assert not any(key in p.read_text() for p in _trail(project).iterdir())


def test_an_unknown_role_is_refused_naming_the_line(project):
    policy = project / "governance" / "policy.csv"
    policy.write_text(policy.read_text() + "g, alice, superuser\n")
    lines = len(policy.read_text().splitlines())
    with pytest.raises(access.PolicyError, match=rf"policy.csv:{lines}: unknown role 'superuser'; the policy's roles"):
        access.load(project)
    result = run([str(BIN / "llmops"), "registry", "rollback", "--why", "x"], project, check=False)
    assert result.returncode == 1 and "unknown role 'superuser'" in result.stderr
    assert not _trail(project).exists()  # nothing was done, nothing recorded
    set_params(project, "governance.default_role=root")
    policy.write_text(policy.read_text().replace("g, alice, superuser\n", ""))
    with pytest.raises(access.PolicyError, match="governance.default_role: unknown role 'root'"):
        access.load(project)


def test_registry_changes_are_audited_with_their_outcome(project):
    with pytest.raises(registry.RegistryError):
        registry.promote(project, "v9", "production", "no such version")
    [record] = audit.records(project)
    assert (record.action, record.outcome, record.version, record.detail["stage"]) == (
        "registry.promote", "failed", "v9", "production")
    assert "v9.0.0" in record.detail["error"]
    assert record.who == identity.current()


@pytest.mark.services
@pytest.mark.training
def test_the_server_lets_each_key_call_only_what_the_policy_allows(project, pipeline):
    from openai import AuthenticationError, OpenAI, PermissionDeniedError

    from conftest import _wait_http, free_port, stop_servers

    llmops = str(BIN / "llmops")
    _people(project)  # key:partner may call model:model only
    admin = _as(project, "admin-person")
    partner = run([llmops, "serve", "keygen", "partner"], project, env=admin).stdout.strip()
    chatbot = run([llmops, "serve", "keygen", "chatbot"], project, env=admin).stdout.strip()
    served = project.parent / "other"  # a model directory whose name is not `model`
    shutil.copytree(pipeline / "models/release", served)
    port = free_port()
    proc = subprocess.Popen([llmops, "serve", "start", "--model", str(served), "--port", str(port)], cwd=project,
                            env=admin, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_http(f"http://127.0.0.1:{port}/health", proc, 120)
        url = f"http://127.0.0.1:{port}/v1"
        with pytest.raises(PermissionDeniedError) as refused:
            OpenAI(base_url=url, api_key=partner, max_retries=0).completions.create(model="other", prompt="1",
                                                                                     max_tokens=1)
        assert refused.value.code == "model_not_allowed" and "key:partner (role partner) may not call model:other" \
            in refused.value.message
        assert OpenAI(base_url=url, api_key=chatbot, max_retries=0).completions.create(
            model="other", prompt="1", max_tokens=1).choices[0].text is not None  # the default key role calls all
        [denied] = [r for r in audit.records(project) if r.outcome == "denied"]
        assert (denied.who, denied.action, denied.object) == ("key:partner", "serve.call", "model:other")
        # a revoked key stops working once the server reloads, without a restart
        run([llmops, "serve", "revoke", "chatbot"], project, env=admin)
        run([llmops, "serve", "reload"], project, env=admin)
        with pytest.raises(AuthenticationError):
            OpenAI(base_url=url, api_key=chatbot, max_retries=0).models.list()
    finally:
        proc.terminate()
        proc.wait(60)
        stop_servers(project)


@pytest.mark.training
def test_licences_are_recorded_and_a_release_built_on_others_is_refused(ran_project):
    llmops = str(BIN / "llmops")
    release = json.loads((ran_project / "models/release/release.json").read_text())
    assert release["licences"] == [
        {"input": "data.instructions (the embedded sample)", "licence": "CC0-1.0"},
        {"input": "data.corpus (the embedded sample)", "licence": "CC0-1.0"},
        {"input": "train.finetune.base_model (pretrain: trained here on data.corpus)", "licence": "CC0-1.0"}]
    tags = run(["git", "tag", "-l", "model*"], ran_project).stdout
    set_params(ran_project, "deploy.allowed_licences=[MIT, Apache-2.0]")
    refused = run([llmops, "registry", "register"], ran_project, check=False)
    assert refused.returncode == 1 and refused.stderr.strip() == (
        "error: registry: models/release cannot be registered: it is built on data.instructions (the embedded "
        "sample), licensed CC0-1.0, which deploy.allowed_licences (MIT, Apache-2.0) does not list")
    assert run(["git", "tag", "-l", "model*"], ran_project).stdout == tags  # nothing registered
    set_params(ran_project, "deploy.allowed_licences=[cc0-1.0]")  # SPDX ids compare case-insensitively
    run([llmops, "registry", "register"], ran_project)
    shown = json.loads(run([llmops, "registry", "show", "v1", "--json"], ran_project).stdout)
    assert shown["lineage"]["licences"] == release["licences"]
    set_params(ran_project, "deploy.allowed_licences=[MIT]")  # what production serves is checked when it moves
    promoted = run([llmops, "registry", "promote", "v1", "--to", "production", "--why", "x"], ran_project, check=False)
    assert promoted.returncode == 1 and "v1.0.0 cannot be promoted to production: it is built on" in promoted.stderr


@pytest.mark.training
def test_every_release_carries_its_model_card_and_the_registry_shows_it(ran_project, tmp_path):
    import re

    from huggingface_hub import ModelCard
    from playwright.sync_api import expect, sync_playwright

    llmops = str(BIN / "llmops")
    card = ModelCard.load(ran_project / "models/release/README.md")  # a Hugging Face model card, metadata and all
    assert card.data.license == "cc0-1.0" and "llmops" in card.data.tags
    evaluate = json.loads((ran_project / "reports/evaluate/metrics.json").read_text())["finetuned"]
    bias = json.loads((ran_project / "reports/audit_bias/metrics.json").read_text())["finetuned"]
    for section in ("## Intended use", "## Limitations", "## Data", "## Training", "## Evaluation", "## Bias audit",
                    "## Quantization", "## Release gate", "## Lineage"):
        assert section in card.text
    low, high = evaluate["exact_match_ci95"]["low"], evaluate["exact_match_ci95"]["high"]
    assert (f"| fine-tuned | {100 * evaluate['exact_match']:.1f}% (95% CI {100 * low:.1f}% to {100 * high:.1f}%)"
            in card.text)
    assert f"fine-tuned {bias['pct_stereotype']:.1f} (95% CI" in card.text
    assert "Validated by Great Expectations" in card.text and "int8_weight_only (torchao): size x" in card.text

    run([llmops, "registry", "register", "--why", "card test"], ran_project)
    run([llmops, "registry", "promote", "v1", "--to", "production", "--why", "ship it"], ran_project)
    page = tmp_path / "card.html"
    shown = run([llmops, "registry", "show", "production", "--html", str(page)], ran_project).stdout
    assert shown.startswith("---\n") and card.text.strip() in shown  # the card stored with the version, as written
    assert "## Registry" in shown and "Version v1.0.0, registered" in shown and "card test" in shown
    assert re.search(r"\| assignment \| production \| .+ \| ship it \|", shown)

    refused = []
    with sync_playwright() as p:  # a person reads the HTML card: it renders with every network request refused
        browser = p.chromium.launch(executable_path=shutil.which("chromium") or shutil.which("chromium-browser"),
                                    headless=True)
        view = browser.new_page()
        view.route(re.compile(r"^(?!file:)"), lambda route: (refused.append(route.request.url), route.abort()))
        view.goto(page.as_uri())
        expect(view.get_by_role("heading", name="Release gate")).to_be_visible()
        expect(view.get_by_role("cell", name="min_score")).to_be_visible()
        expect(view.get_by_text("Stages now: production")).to_be_visible()
        browser.close()
    assert not refused


def test_identity_is_not_self_asserted(project):
    """LLMOPS_USER once was the identity: `LLMOPS_USER=admin` granted admin. Now the CLI acts as the OS account, or
    as a key of the project (LLMOPS_TOKEN); a name given on the command line must be that identity."""
    import pwd

    _people(project)
    llmops = str(BIN / "llmops")
    claimed = run([llmops, "registry", "rollback", "--why", "x"], project, env=base_env(LLMOPS_USER="admin"),
                  check=False)
    assert claimed.returncode == 1 and "LLMOPS_USER names no identity any more" in claimed.stderr
    forged = run([llmops, "registry", "rollback", "--why", "x"], project,
                 env=base_env(LLMOPS_TOKEN="sk-llmops-made-up"), check=False)
    assert forged.returncode == 1 and "LLMOPS_TOKEN is not a key of this project" in forged.stderr
    # a variable the server reads for its keys names no CLI identity either: anyone can set it
    from llmops.governance.apikeys import hash_key
    env = base_env(LLMOPS_TOKEN="sk-llmops-mine", LLMOPS_API_KEY_HASHES=f"{hash_key('sk-llmops-mine')}:admin-person")
    assert "not a key of this project" in run([llmops, "registry", "rollback", "--why", "x"], project, env=env,
                                               check=False).stderr
    # without a token: the OS account, whatever $USER or git say
    env = base_env(USER="admin-person", LOGNAME="admin-person", GIT_AUTHOR_NAME="admin-person")
    refused = run([llmops, "registry", "rollback", "--why", "x"], project, env=env, check=False)
    assert f"{pwd.getpwuid(__import__('os').geteuid()).pw_name} (role viewer) may not rollback" in refused.stderr
    # --reviewer must be the one acting
    viewer = _as(project, "viewer-person")
    for command in (["approve", "some-run", "--reason", "fine", "--reviewer", "approver-person"],
                    ["feedback", "accept", "cmpl-1", "--reason", "fine", "--reviewer", "approver-person"]):
        named = run([llmops, *command], project, env=viewer, check=False)
        assert named.returncode == 1 and "--reviewer 'approver-person' is not you ('key:viewer-person')" \
            in named.stderr, named.stderr


def test_every_mutating_command_goes_through_the_policy_and_the_trail(project):
    """feedback accept/reject and serve stop/reload are refused to those the policy does not allow, and audited."""
    from datetime import datetime, timezone

    from llmops.serving.feedback import Store, database_url

    _people(project)
    llmops = str(BIN / "llmops")
    Store(database_url(project)).record_request("cmpl-1", datetime.now(timezone.utc), None, "2 + 2?", "5")
    viewer, approver = _as(project, "viewer-person"), _as(project, "approver-person")
    for command in (["feedback", "accept", "cmpl-1", "--reason", "right", "--correction", "4"],
                    ["serve", "stop"], ["serve", "reload"]):
        refused = run([llmops, *command], project, env=viewer, check=False)
        assert refused.returncode == 1 and "key:viewer-person (role viewer) may not" in refused.stderr, refused.stderr
    accepted = run([llmops, "feedback", "accept", "cmpl-1", "--reason", "right", "--correction", "4"], project,
                   env=approver)
    assert "accepted cmpl-1" in accepted.stdout
    trail = [(r.who, r.action, r.outcome) for r in audit.records(project)]
    assert trail == [("key:viewer-person", "feedback.accept", "denied"), ("key:viewer-person", "serve.stop", "denied"),
                     ("key:viewer-person", "serve.reload", "denied"), ("key:approver-person", "feedback.accept", "ok")]


def test_a_hand_edit_of_the_policy_is_named_by_verify_and_cannot_record_itself(project):
    _people(project)
    llmops = str(BIN / "llmops")
    admin, viewer = _as(project, "admin-person"), _as(project, "viewer-person")
    assert "recorded the access policy as record 1" in run([llmops, "trail", "policy", "--why", "people"], project,
                                                            env=admin).stdout
    assert run([llmops, "trail", "verify"], project).returncode == 0
    policy = project / "governance/policy.csv"
    policy.write_text(policy.read_text() + "g, key:viewer-person, admin\n")  # a viewer makes themselves admin
    verify = run([llmops, "trail", "verify"], project, check=False)
    assert verify.returncode == 3 and "is not the one record 1 recorded: it was changed outside llmops" \
        in verify.stderr
    # the edit cannot record itself: the change is judged by the policy last recorded, where they are a viewer
    selfmade = run([llmops, "trail", "policy", "--why", "me"], project, env=viewer, check=False)
    assert selfmade.returncode == 1 and "key:viewer-person (role viewer) may not change policy" in selfmade.stderr
    run([llmops, "trail", "policy", "--why", "promoted the viewer"], project, env=admin)  # an admin's decision
    assert run([llmops, "trail", "verify"], project).returncode == 0
    assert [r.outcome for r in audit.records(project) if r.action == "policy.change"] == ["ok", "denied", "ok"]
