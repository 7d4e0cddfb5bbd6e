"""The model registry: versions and stages are GTO git tags on commits whose dvc.lock pins the files.

Why GTO (git tags + the DVC remote) and not MLflow's registry: the registry then lives with the
artifacts, so a fresh clone has it (`git clone` brings the tags, `dvc artifacts get` or
`llmops registry pull` the files, from S3 or wherever the DVC remote is), with no database or
server to run; and every change is a new tag, so the stage history (who, when, why) is kept
whole, where MLflow keeps no alias history and needs a database.

- A version (`model@v3.0.0`) tags a commit of the working tree as the run left it: HEAD's tree
  plus dvc.lock, params.yaml and .dvc/config (the branch and HEAD do not move). Its tag message
  is JSON: who registered it, why, and the lineage (models/release/release.json: the variant, the
  hashes of its sources, the gate's verdict and scores; the parent version; the code commit).
- A stage (staging, production) moves by two tags: the current holder is unassigned
  (`model#production!#N`), then the new one assigned (`model#production#N+1`), so exactly one
  version holds a stage and GTO and `dvc artifacts get --stage` agree on which. Rollback is the
  same move, to the previous holder. Nothing is ever deleted.
- A reviewer's decision on promoting a version to production (deploy.require_approval) is an
  annotated tag `reviews/model/v3.0.0/N` on the version's commit, outside GTO's tag grammar (no
  `@` or `#`), with who decided and why; `history()` shows it among GTO's events.
- With registry.git_remote set (e.g. origin), that remote holds the shared registry: writers
  take a file lock, fetch the remote's tags first, and push the new tags atomically;
  a push refused because another clone moved first is undone locally and retried. Tags are
  written a second apart: GTO and DVC order events by their whole-second timestamps.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any, Iterator

from llmops.core import git
from llmops.core.errors import LlmopsError
from llmops.governance import audit, identity

ARTIFACT = "model"  # the dvc.yaml `artifacts:` entry (models/release)
STAGES = ("staging", "canary", "production")  # canary: a share of production's traffic (its assignment says how much)
REVIEWS = f"reviews/{ARTIFACT}"  # reviews/model/<version>/<n>
RELEASE = Path("models/release")
_ATTEMPTS = 5


class RegistryError(LlmopsError):
    """A registry operation that cannot be done; the message says why. Nothing was changed."""


@dataclass
class Version:
    version: str
    commit: str
    created_at: str
    author: str
    record: dict[str, Any]  # the registration's JSON: by, why, lineage
    stages: list[str] = field(default_factory=list)

    @property
    def lineage(self) -> dict[str, Any]:
        return self.record.get("lineage", {})


_git = partial(git.out, error=RegistryError)  # git's failures as the registry's own error


def _repo(root: str | os.PathLike) -> Path:
    root = Path(root).resolve()
    if not git.ok(root, "rev-parse", "--verify", "-q", "HEAD"):
        raise RegistryError(f"{root} is not a git repository with a commit; the registry keeps versions as git "
                            "tags (`git init && git add -A && git commit -m start`)")
    return root


def _remote(root: Path) -> str | None:
    """params.yaml's registry.git_remote, checked to exist in this clone."""
    from llmops.core.config import PARAMS_FILE, ConfigError, load_params

    try:
        name = load_params(root / PARAMS_FILE).registry.git_remote
    except ConfigError as exc:
        raise RegistryError(str(exc)) from None
    if name is not None and name not in _git(root, "remote").split():
        raise RegistryError(f"registry.git_remote: this clone has no git remote {name!r} (`git remote -v`)")
    return name


@contextmanager
def _writing(root: Path) -> Iterator[None]:
    """One writer per clone at a time (blocking: a second promotion waits for the first, then sees its result)."""
    from filelock import FileLock, Timeout

    try:
        with FileLock(Path(_git(root, "rev-parse", "--absolute-git-dir")) / "llmops-registry.lock", timeout=120):
            yield
    except Timeout:
        raise RegistryError("another registry change in this clone has held its lock for 120 s; try again") from None


def _fetch(root: Path) -> None:
    remote = _remote(root)
    if remote is not None:
        try:
            _git(root, "fetch", "--quiet", "--tags", "--force", remote)
        except RegistryError as exc:
            raise RegistryError(f"registry remote {remote!r} ({_git(root, 'remote', 'get-url', remote)}) "
                                f"cannot be read: {exc}; nothing was changed") from None


def refresh(root: str | os.PathLike) -> str | None:
    """Bring the remote's tags (what other clones registered and promoted) before reading; a warning if it can't."""
    try:
        _fetch(_repo(root))
    except RegistryError as exc:
        return f"warning: {str(exc).removesuffix('; nothing was changed')}; showing this clone's registry"
    return None


def _tick() -> None:
    """Wait for the next whole second: two events in one second would be ordered by name, not time."""
    now = time.time()
    time.sleep(int(now) + 1.01 - now)


def _new_tags(root: Path, before: set[str]) -> list[str]:
    return sorted(_tags(root) - before)


def _tags(root: Path) -> set[str]:
    return set(_made_at(root))


def _made_at(root: Path) -> dict[str, int]:
    """The registry's tags (versions, stage moves, reviews) -> when each was made (unix seconds)."""
    listed = _git(root, "for-each-ref", "--format=%(refname:short) %(creatordate:unix)",
                  f"refs/tags/{ARTIFACT}@*", f"refs/tags/{ARTIFACT}#*", f"refs/tags/{REVIEWS}/")
    return {tag: int(when) for tag, _, when in (line.partition(" ") for line in listed.splitlines()) if when}


_MADE: ContextVar[list[str] | None] = ContextVar("registry_tags_made", default=None)


@contextmanager
def _audited(root: Path, action: str, version: str | None = None, **kwargs: Any) -> Iterator[dict[str, Any]]:
    """audit.recorded for a registry change, whose record also names the tags the change made: `unaudited` holds
    every registry tag against those names, so a tag made by hand (a `model#production#99` moving production) is
    found, and refused where it would be served."""
    made = _MADE.set([])
    try:
        with audit.recorded(root, action, ARTIFACT, version, **kwargs) as note:
            yield note
            note["tags"] = list(_MADE.get())
    finally:
        _MADE.reset(made)


def unaudited(root: str | os.PathLike, trail: list[audit.Record] | None = None) -> list[str]:
    """The registry's tags (versions, stage moves, reviews) made since the audit trail began that no record of it
    says llmops made (`trail`: its records, where the caller has read them already). Tags from before the trail's
    first record (a trail moved with a new storage remote, or a registry older than this check) are not judged:
    nothing could account for them."""
    trail = list(audit.records(root)) if trail is None else trail
    if not trail:
        return []
    named = {tag for r in trail if r.action.startswith("registry.") and r.outcome == "ok"
             for tag in r.detail.get("tags", [])}
    began = int(datetime.fromisoformat(trail[0].at.replace("Z", "+00:00")).timestamp())
    return sorted(tag for tag, when in _made_at(_repo(root)).items() if when >= began and tag not in named)


def _change(root: Path, write) -> Any:
    """Run `write()` (GTO tag writes) under the lock on fresh tags; push its tags atomically, or undo them.

    A push refused because the remote moved on (another clone promoted meanwhile) is undone
    and the whole decision retried on the new state.
    """
    from gto.exceptions import GTOException
    from scmrepo.exceptions import SCMError

    with _writing(root):
        for attempt in range(_ATTEMPTS):
            _fetch(root)
            before = _tags(root)
            try:
                result = write()
            except (GTOException, SCMError) as exc:  # a tag name taken meanwhile: decide again
                _undo(root, _new_tags(root, before))
                if attempt == _ATTEMPTS - 1:
                    raise RegistryError(f"registry change failed: {exc}") from None
                continue
            created, remote = _new_tags(root, before), _remote(root)
            if (made := _MADE.get()) is not None:
                made.extend(created)  # undone below if the push fails: the retry makes its own
            if not created or remote is None:
                return result
            push = git.run(root, "push", "--quiet", "--atomic", remote, *(f"refs/tags/{t}" for t in created))
            if push.returncode == 0:
                return result
            _undo(root, created)
            if made is not None:
                del made[len(made) - len(created):]
            if "rejected" not in push.stderr and "already exists" not in push.stderr:
                reason = (push.stderr.strip().splitlines() or ["no answer"])[-1]
                raise RegistryError(f"registry remote {remote!r} cannot be written ({reason}); nothing was changed")
        raise RegistryError(f"registry change failed {_ATTEMPTS} times: other clones kept changing it; try again")


def _undo(root: Path, tags: list[str]) -> None:
    for tag in tags:
        git.run(root, "tag", "-d", tag)


def _record(message: str) -> dict[str, Any]:
    try:
        record = json.loads(message or "{}")
    except json.JSONDecodeError:  # a tag made by hand with `gto`: its message is the reason
        return {"why": message}
    return record if isinstance(record, dict) else {"why": message}


def versions(root: str | os.PathLike) -> list[Version]:
    """Every registered version, newest first, with the stages each holds now."""
    from gto import api
    from gto.exceptions import ArtifactNotFound, GTOException

    root = _repo(root)
    try:
        shown = api.show(str(root), ARTIFACT)
    except ArtifactNotFound:
        return []
    except GTOException as exc:  # e.g. two version tags on one commit: a tag made by hand
        made = ", ".join(unaudited(root)) or "none"
        raise RegistryError(f"the registry's git tags contradict each other ({exc}); tags no audit record says llmops "
                            f"made: {made}; delete the one made by hand (`git tag -d TAG`, and on the remote)") from None
    found = []
    for v in shown:
        reg = (v.get("registrations") or [{}])[0]
        found.append(Version(version=v["version"], commit=v["commit_hexsha"], created_at=str(v["created_at"]),
                             author=str(reg.get("author") or v.get("author")), record=_record(reg.get("message", "")),
                             stages=[s["stage"] for s in v.get("stages", [])]))
    return sorted(found, key=lambda v: _semver(v.version), reverse=True)


def _semver(version: str) -> tuple[int, ...]:
    return tuple(int(x) for x in version.lstrip("v").split("+")[0].split("-")[0].split("."))


def get(root: str | os.PathLike, version: str) -> Version:
    """One version (`v3.0.0`, `v3` or `3`).

    Raises:
        RegistryError: no such version; the message lists the known ones.
    """
    wanted = normalize(version)
    known = versions(root)
    for v in known:
        if v.version == wanted:
            return v
    names = ", ".join(v.version for v in known) or "none yet"
    raise RegistryError(f"no model version {version!r} in the registry (registered: {names})")


def normalize(version: str) -> str:
    """`3` and `v3` mean v3.0.0: versions are whole numbers, one per registered release."""
    bare = version.strip().lstrip("v")
    parts = bare.split(".")
    if not bare or not all(p.isdigit() for p in parts) or len(parts) > 3:
        raise RegistryError(f"{version!r} is not a model version (like v3 or v3.0.0)")
    return "v" + ".".join(parts + ["0"] * (3 - len(parts)))


def holder(root: str | os.PathLike, stage: str, known: list[Version] | None = None) -> Version | None:
    """The version that holds `stage` now (among `known`, when the caller has just read them), or None."""
    for v in versions(root) if known is None else known:
        if stage in v.stages:
            return v
    return None


def resolve(root: str | os.PathLike, ref: str) -> Version:
    """A stage's holder (`production`) or a version (`v3`).

    Raises:
        RegistryError: no version holds the stage, or no such version.
    """
    if ref in STAGES:
        held = holder(root, ref)
        if held is None:
            raise RegistryError(f"no version holds {ref}")
        return held
    return get(root, ref)


def _snapshot(root: Path, message: str) -> str:
    """A commit of the working tree as it is (tracked and new files, .gitignore respected), parented on HEAD.

    Neither HEAD, the branch nor the index move: the commit is reachable through its tag only.
    """
    head = _git(root, "rev-parse", "HEAD")
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "GIT_INDEX_FILE": str(Path(tmp) / "index")}
        _git(root, "read-tree", "HEAD", env=env)
        _git(root, "add", "-A", env=env)
        tree = _git(root, "write-tree", env=env)
        if tree == _git(root, "rev-parse", "HEAD^{tree}"):
            return head
        if not identity.git_user():
            name = identity.current(root)
            env.update(GIT_AUTHOR_NAME=name, GIT_AUTHOR_EMAIL=f"{name}@llmops", GIT_COMMITTER_NAME=name,
                       GIT_COMMITTER_EMAIL=f"{name}@llmops")
        return _git(root, "commit-tree", tree, "-p", head, "-m", message, env=env)


def locked_stages(root: str | os.PathLike, commit: str) -> dict[str, dict]:
    """The stages of that commit's dvc.lock (each with its deps and outs, hashed); empty if it has none."""
    from ruamel.yaml import YAML

    text = git.answer(root, "show", f"{commit}:dvc.lock")
    return (YAML(typ="safe").load(text) or {}).get("stages", {}) if text else {}


def _release_hash(root: Path, commit: str) -> str | None:
    """The DVC hash of models/release in that commit's dvc.lock."""
    for out in locked_stages(root, commit).get("release", {}).get("outs", []):
        if out.get("path") == str(RELEASE):
            return out.get("md5")
    return None


def register(root: str | os.PathLike, why: str) -> tuple[Version, bool]:
    """Register the released model (models/release/) as the next version (see `_register`); audited."""
    root = _repo(root)
    with _audited(root, "registry.register", allow=("register", "registry"), why=why) as note:
        version, new = _register(root, why)
        note.update(version=version.version, new=new)
    return version, new


def _register(root: Path, why: str) -> tuple[Version, bool]:
    """Register the released model (models/release/, as dvc.lock pins it) as the next version.

    Returns the version and whether it is new: a release identical to the latest version's
    (same DVC hash) is that version, not a new one.

    Raises:
        RegistryError: no release to register (the gate did not pass, or release has not run),
            dvc.lock does not pin it, or the registry remote cannot be read or written.
    """
    from gto import api

    release_file = root / RELEASE / "release.json"
    if not release_file.is_file():
        raise RegistryError(f"{RELEASE}/release.json: no such file; only a model the gate passed is released "
                            "(`llmops run`)")
    release = json.loads(release_file.read_text())
    if not release.get("gate", {}).get("passed"):
        raise RegistryError(f"{RELEASE}: the gate did not pass it; it cannot be registered")
    _licensed(root, release, f"{RELEASE} cannot be registered")
    commit = _snapshot(root, f"llmops: {ARTIFACT} release ({release['variant']})")
    digest = _release_hash(root, commit)
    if digest is None:
        raise RegistryError(f"dvc.lock does not pin {RELEASE}; run the pipeline (`llmops run`) before registering")

    def write() -> tuple[Version, bool]:
        known = versions(root)
        for v in known:
            if v.lineage.get("release_md5") == digest:
                return v, False
        version = f"v{(_semver(known[0].version)[0] if known else 0) + 1}.0.0"
        parent = holder(root, "production", known)
        record = {"by": identity.current(root), "why": why, "lineage": {
            "release_md5": digest, "code_commit": _git(root, "rev-parse", "HEAD"),
            "parent_version": parent.version if parent else None, **release}}
        _tick()
        api.register(str(root), ARTIFACT, ref=commit, version=version, message=json.dumps(record, sort_keys=True))
        return Version(version=version, commit=commit, created_at="now", author=record["by"], record=record), True

    return _change(root, write)


def _licensed(root: Path, lineage: dict, what: str) -> None:
    """Refuse a release built on an input whose licence deploy.allowed_licences does not list."""
    from llmops.core.config import PARAMS_FILE, ConfigError, load_params
    from llmops.training.licences import LicenceError, check

    try:
        check(lineage, load_params(root / PARAMS_FILE).deploy.allowed_licences, what)
    except (ConfigError, LicenceError) as exc:
        raise RegistryError(str(exc)) from None


@dataclass(frozen=True)
class Canary:
    version: Version
    share: float  # percent of production's traffic, 0-100 exclusive


def promote(root: str | os.PathLike, version: str, stage: str, why: str, purpose: str = "promote",
            share: float | None = None) -> Version | None:
    """Give `version` the stage (see `_promote`); allowed by the access policy (`purpose`: promote by hand, or the
    pipeline's deploy) and audited. The canary stage takes the `share` of production's traffic it gets."""
    root = _repo(root)
    with _audited(root, "registry.promote", version, allow=(purpose, f"stage:{stage}"), stage=stage, why=why,
                  **({"share": share} if share is not None else {})) as note:
        before = _promote(root, version, stage, why, share)
        note.update(version=normalize(version), replaced=before.version if before else None)
    return before


def _promote(root: Path, version: str, stage: str, why: str, share: float | None = None) -> Version | None:
    """Give `version` the stage; return the version that held it before (None if none).

    Raises:
        RegistryError: unknown stage or version, a version the gate did not pass, one that
            already holds the stage, a canary without a share in (0, 100) or one that holds production, or a
            registry remote that cannot be read or written.
    """
    if stage not in STAGES:
        raise RegistryError(f"unknown stage {stage!r}; stages are {', '.join(STAGES)}")
    if (stage == "canary") != (share is not None):
        raise RegistryError("a canary takes a share of production's traffic (--share PERCENT), and only a canary does")
    if share is not None and not 0 < share < 100:
        raise RegistryError(f"canary share {share:g}% is outside 0-100% (exclusive: 100% is a promotion to "
                            "production, 0% no canary)")
    target = normalize(version)

    def write() -> Version | None:
        wanted = get(root, target)
        if f"{ARTIFACT}@{wanted.version}" in unaudited(root):  # a forged version tag, its lineage forged with it
            raise RegistryError(f"{wanted.version} was registered outside llmops (no audit record names its tag "
                                f"{ARTIFACT}@{wanted.version}); it cannot be promoted")
        if not wanted.lineage.get("gate", {}).get("passed"):
            raise RegistryError(f"{wanted.version} did not pass the release gate; it cannot be promoted")
        if stage in ("production", "canary"):  # what these hold is served
            _licensed(root, wanted.lineage, f"{wanted.version} cannot be promoted to {stage}")
        if stage == "canary" and "production" in wanted.stages:
            raise RegistryError(f"{wanted.version} holds production already; a canary is another version")
        current = holder(root, stage)
        if current is not None and current.version == wanted.version and stage != "canary":
            raise RegistryError(f"{wanted.version} already holds {stage}")
        _move(root, stage, current, wanted, why, share)  # a canary may move to another share
        return current

    return _change(root, write)


def _move(root: Path, stage: str, current: Version | None, target: Version, why: str,
          share: float | None = None) -> None:
    from gto import api

    if current is not None:
        _unassign(root, stage, current, f"replaced by {target.version}: {why}")
    _tick()
    record = {"by": identity.current(root), "why": why} | ({"share": share} if share is not None else {})
    api.assign(str(root), ARTIFACT, stage, version=target.version, force=True, message=json.dumps(record))


def _unassign(root: Path, stage: str, current: Version, why: str) -> None:
    from gto import api

    _tick()
    api.unassign(str(root), ARTIFACT, version=current.version, stage=stage,
                 message=json.dumps({"by": identity.current(root), "why": why}))


def canary(root: str | os.PathLike, known: list[Version] | None = None) -> Canary | None:
    """The canary version and its share of production's traffic, or None."""
    held = holder(root, "canary", known)
    if held is None:
        return None
    shares = [e["share"] for e in history(root, "canary") if e["event"] == "assignment" and e["version"] == held.version]
    return Canary(held, float(shares[-1]))


def drop(root: str | os.PathLike, stage: str, why: str) -> Version:
    """Take the stage from its holder, giving it to nobody (a canary dropped); allowed as a rollback, audited.

    Raises:
        RegistryError: nothing holds the stage.
    """
    root = _repo(root)
    with _audited(root, "registry.drop", allow=("rollback", f"stage:{stage}"), stage=stage, why=why) as note:
        def write() -> Version:
            current = holder(root, stage)
            if current is None:
                raise RegistryError(f"no version holds {stage}; nothing to drop")
            _unassign(root, stage, current, why)
            return current

        dropped = _change(root, write)
        note.update(version=dropped.version)
    return dropped


def history(root: str | os.PathLike, stage: str | None = None) -> list[dict[str, Any]]:
    """Every registry event, oldest first: registration, assignment, unassignment, and reviewers' decisions
    (approved, rejected); with who and why."""
    from gto import api
    from gto.exceptions import ArtifactNotFound

    root = _repo(root)
    try:
        events = api.history(str(root), ARTIFACT, ascending=True)
    except ArtifactNotFound:
        return []
    out = []
    for e in events:
        if e["event"] not in ("registration", "assignment", "unassignment") or (stage and e.get("stage") != stage):
            continue
        record = _record(e.get("message", ""))
        out.append({"time": str(e["timestamp"]), "event": e["event"], "version": e["version"],
                    "stage": e.get("stage"), "by": record.get("by") or e.get("author"), "why": record.get("why", ""),
                    "tag": e.get("ref"), "share": record.get("share")})
    out += [r for r in _reviews(root) if not stage or r["stage"] == stage]
    return sorted(out, key=lambda e: datetime.fromisoformat(e["time"]))  # GTO's and the reviews' carry offsets


def review(root: str | os.PathLike, version: str, approved: bool, by: str, why: str, by_person: bool = True) -> None:
    """Record a reviewer's decision (see `_review`); audited as the reviewer's, who must be allowed to approve
    (unless `by_person` is false: the rejection a review that timed out ends in)."""
    root = _repo(root)
    with _audited(root, "registry.approve" if approved else "registry.reject", version, who=by,
                  allow=("approve", "stage:production") if by_person else None, stage="production", why=why) as note:
        _review(root, version, approved, by, why)
        note["version"] = normalize(version)


def _review(root: Path, version: str, approved: bool, by: str, why: str) -> None:
    """Record a reviewer's decision on promoting `version` to production (it promotes nothing itself).

    Raises:
        RegistryError: unknown version, or a registry remote that cannot be read or written.
    """

    def write() -> None:
        target = get(root, normalize(version))
        n = sum(tag.startswith(f"{REVIEWS}/{target.version}/") for tag in _tags(root)) + 1
        record = {"by": by, "why": why, "decision": "approved" if approved else "rejected", "stage": "production"}
        _tick()
        _git(root, "tag", "-a", f"{REVIEWS}/{target.version}/{n}", target.commit, "-m",
             json.dumps(record, sort_keys=True))

    _change(root, write)


def _reviews(root: Path) -> list[dict[str, Any]]:
    out = []
    listed = _git(root, "for-each-ref", f"refs/tags/{REVIEWS}", "--format=%(refname:short)%00%(taggerdate:iso8601-strict)"
                  "%00%(taggername)%00%(contents)%00%00")
    for entry in filter(str.strip, listed.split("\0\0")):
        tag, time_, tagger, message = entry.strip("\n").split("\0", 3)
        record = _record(message.strip())
        out.append({"time": str(datetime.fromisoformat(time_)), "event": record.get("decision", "review"),
                    "version": tag.split("/")[2], "stage": record.get("stage"), "by": record.get("by") or tagger, "why": record.get("why", ""),
                    "tag": tag})
    return out


def rollback(root: str | os.PathLike, stage: str, why: str, purpose: str = "rollback") -> tuple[Version, Version]:
    """Give `stage` back to the version that held it before (see `_rollback`); allowed by the access policy
    (`purpose`: by hand, or the pipeline's deploy undoing its own promotion) and audited."""
    root = _repo(root)
    with _audited(root, "registry.rollback", allow=(purpose, f"stage:{stage}"), stage=stage, why=why) as note:
        current, previous = _rollback(root, stage, why)
        note.update(version=previous.version, replaced=current.version)
    return current, previous


def _rollback(root: Path, stage: str, why: str) -> tuple[Version, Version]:
    """Give `stage` back to the version that held it before the current one; returns (from, to).

    Raises:
        RegistryError: nothing holds the stage, or no other version ever held it.
    """
    if stage not in STAGES:
        raise RegistryError(f"unknown stage {stage!r}; stages are {', '.join(STAGES)}")

    def write() -> tuple[Version, Version]:
        current = holder(root, stage)
        if current is None:
            raise RegistryError(f"no version holds {stage}; nothing to roll back")
        earlier = [e["version"] for e in history(root, stage) if e["event"] == "assignment"
                   and e["version"] != current.version]
        if not earlier:
            raise RegistryError(f"{current.version} is the only version that ever held {stage}; "
                                "there is no previous one to roll back to")
        previous = get(root, earlier[-1])
        _move(root, stage, current, previous, f"rollback from {current.version}: {why}")
        return current, previous

    return _change(root, write)


def card(root: str | os.PathLike, version: Version) -> str:
    """The model card the release stage wrote into `version` (its README.md), read from the DVC cache or remote.

    Raises:
        RegistryError: the version has no card (released before cards were written), or its files cannot be read.
    """
    import dvc.api

    path = f"{RELEASE}/README.md"
    try:
        return dvc.api.read(path, repo=str(_repo(root)), rev=version.commit)
    except FileNotFoundError:
        raise RegistryError(f"{version.version} has no model card ({path}: released before cards were written)") \
            from None
    except Exception as exc:  # DVC's own errors: an unreachable remote, files never pushed
        raise RegistryError(f"{version.version}'s model card cannot be read from the DVC cache or remote: "
                            f"{type(exc).__name__}: {exc}") from None


def pull(root: str | os.PathLike, ref: str, out: str | os.PathLike) -> Version:
    """Download the files of a version (`v3`) or of a stage's holder (`production`) into `out`, from the DVC remote.

    Raises:
        RegistryError: unknown version or stage, or the files cannot be fetched.
    """
    from dvc.exceptions import DvcException
    from dvc.repo.artifacts import Artifacts

    root = _repo(root)
    _fetch(root)
    target = resolve(root, ref)
    try:
        Artifacts.get(str(root), ARTIFACT, version=target.version, out=str(out), force=True)
    except DvcException as exc:
        raise RegistryError(f"{target.version}: its files cannot be fetched from the DVC remote: "
                            f"{str(exc).splitlines()[0]}") from None
    return target
