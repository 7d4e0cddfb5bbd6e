"""The audit trail: who did what to which object and version, when, and with what outcome.

Every action that changes what is trained, registered or served appends one record. The trail
lives with the artifacts, beside the DVC remote's files (`<remote>/audit/`, a local directory or
an S3 prefix), so it is as durable and as shared as the models it speaks of.

- **Hash-chained.** A record holds the previous record's hash, and its own hash covers all its
  fields, so a changed record, a removed one or two swapped ones break the chain at that point, and
  `verify` names it.
- **One object per record, written only if absent** (`<seq>.json`; O_EXCL locally, S3's conditional
  `PutObject` with `If-None-Match: *`): of two writers racing for the same sequence number one wins,
  the other reads the new head and takes the next. The chain never forks and no record is lost,
  with no lock server and no append (S3 has none).
- **Anchored.** After each append the record's hash is put in an annotated git tag
  `audit/<trail>/<seq>` (`<trail>`: a hash of the trail's location, so a clone whose remote is another has
  anchors of its own; pushed to registry.git_remote when one is set, as the registry's tags are). A writer
  who can rewrite the trail's files still cannot rewrite the shared repository's tags without a forced
  push, so cutting off the tail, or rewriting the chain and recomputing every hash, is caught by
  `verify`. On S3, `governance.audit_lock_days` also writes every record under S3 Object Lock
  (compliance mode): nobody can delete or overwrite it before then.

Records never hold personal data (an erasure records the subject's hash, not the subject) and never
secrets (an API key is named by its name, never by its value).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Iterable, Iterator

from llmops.core import git
from llmops.core.config import StorageParams
from llmops.core.errors import LlmopsError

logger = logging.getLogger("llmops.governance.audit")
PREFIX = "audit"
TAGS = "audit"  # git tags audit/<trail>/<seq>
_WIDTH = 12  # 000000000042.json: names sort as numbers
_ATTEMPTS = 200  # writers racing for the head; each lost race costs one read


class AuditError(LlmopsError):
    """The audit trail cannot be read or written; the message says why."""


@dataclass(frozen=True)
class Record:
    seq: int
    at: str  # UTC, ISO 8601 with milliseconds
    who: str
    action: str  # e.g. registry.promote, stage.train@finetune, serve.keygen, serve.call
    object: str  # what it acted on: model, a stage, an API key's name, a dataset
    version: str | None  # which version of it, where there is one
    outcome: str  # ok, failed, denied
    detail: dict[str, Any] = field(default_factory=dict)
    prev: str = ""  # the previous record's hash ("" for the first)
    hash: str = ""

    def body(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "hash"}


def digest(body: dict[str, Any]) -> str:
    """sha256 over the record's canonical JSON (sorted keys, no spaces): the same bytes on every machine."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


# --- where the records live -----------------------------------------------------------------------------------------

class _Local:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.where = str(path)

    def seqs(self) -> list[int]:
        if not self.path.is_dir():
            return []
        return sorted(int(p.stem) for p in self.path.glob("*.json") if p.stem.isdigit())

    def read(self, seq: int) -> bytes:
        return (self.path / _name(seq)).read_bytes()

    def create(self, seq: int, data: bytes, lock_days: int = 0) -> bool:  # a local file has no lock: the anchors do
        self.path.mkdir(parents=True, exist_ok=True)
        final = self.path / _name(seq)
        # written whole under a temporary name, then linked into place: link() fails if the name exists (atomic on
        # every local filesystem), so a reader never sees half a record and a lost race changes nothing
        tmp = self.path / f".{_name(seq)}.{os.getpid()}.{time.monotonic_ns()}.tmp"
        tmp.write_bytes(data)
        try:
            os.link(tmp, final)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink()


class _S3:
    def __init__(self, storage: StorageParams) -> None:
        from llmops.core.storage import s3_client

        self.storage = storage
        self.bucket = storage.bucket
        self.prefix = "/".join(p for p in (storage.prefix.strip("/"), PREFIX) if p) + "/"
        self.where = f"s3://{self.bucket}/{self.prefix}"
        self.client = s3_client(storage)

    def seqs(self) -> list[int]:
        found = []
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix):
                for obj in page.get("Contents", []):
                    stem = obj["Key"][len(self.prefix):].removesuffix(".json")
                    if stem.isdigit():
                        found.append(int(stem))
        except Exception as exc:
            raise self._error(exc, "list") from None
        return sorted(found)

    def read(self, seq: int) -> bytes:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self.prefix + _name(seq))["Body"].read()
        except Exception as exc:
            raise self._error(exc, f"read {_name(seq)} from") from None

    def create(self, seq: int, data: bytes, lock_days: int = 0) -> bool:
        from botocore.exceptions import ClientError

        extra: dict[str, Any] = {}
        if lock_days:
            extra = {"ObjectLockMode": "COMPLIANCE",
                     "ObjectLockRetainUntilDate": datetime.now(timezone.utc) + timedelta(days=lock_days)}
        try:
            self.client.put_object(Bucket=self.bucket, Key=self.prefix + _name(seq), Body=data, IfNoneMatch="*",
                                   ContentType="application/json", **extra)
            return True
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict"):
                return False
            raise self._error(exc, "write to") from None
        except Exception as exc:
            raise self._error(exc, "write to") from None

    def _error(self, exc: Exception, doing: str) -> AuditError:
        from llmops.core.storage import explain

        return AuditError(str(explain(exc, f"audit trail: cannot {doing} {self.where}", self.storage)))


def _name(seq: int) -> str:
    return f"{seq:0{_WIDTH}d}.json"


def _store(storage: StorageParams, root: Path):
    if storage.remote == "s3":
        return _S3(storage)
    return _Local((root / Path(storage.url).expanduser()).resolve() / PREFIX)


def _trail(store) -> str:
    """The trail's name in its anchors' tags: a hash of where it lives."""
    return hashlib.sha256(store.where.encode()).hexdigest()[:12]


def _load(store, seq: int) -> Record:
    try:
        return Record(**json.loads(store.read(seq)))
    except (ValueError, TypeError) as exc:
        raise AuditError(f"audit trail: record {seq} in {store.where} is not a record ({exc}); run `llmops trail "
                         "verify`") from None


# --- writing --------------------------------------------------------------------------------------------------------

def append(root: str | os.PathLike, action: str, object: str, version: str | None = None, outcome: str = "ok",
           detail: dict[str, Any] | None = None, who: str | None = None) -> Record:
    """Append one record to this project's trail and anchor it; returns it.

    Args:
        root: the project (its params.yaml names the storage; its git repository holds the anchors).
        action: what was done (`registry.promote`, `stage.train@finetune`, `serve.keygen`, ...).
        object: what it was done to; version: which version of it.
        outcome: ok, failed or denied.
        detail: small facts that explain the record (why, the stage's error); never personal data or secrets.
        who: the identity acting (default: `identity.current(root)`).

    Raises:
        AuditError: the trail's storage cannot be read or written; nothing was appended.
    """
    from llmops.governance import identity

    root = Path(root)
    params = _params(root)
    store = _store(params.storage, root)
    lock_days = params.governance.audit_lock_days if isinstance(store, _S3) else 0
    who = who or identity.current(root)
    # which checkout wrote it: a trail may be shared (clones of one project on one remote), never silently
    detail = {**(detail or {}), "where": where(root)}
    for _ in range(_ATTEMPTS):
        seqs = store.seqs()
        head = _load(store, seqs[-1]) if seqs else None
        body = Record(seq=(head.seq + 1) if head else 1, at=_now(), who=who, action=action, object=object,
                      version=version, outcome=outcome, detail=detail, prev=head.hash if head else "").body()
        record = Record(**body, hash=digest(body))
        data = (json.dumps(asdict(record), sort_keys=True, ensure_ascii=False) + "\n").encode()
        if store.create(record.seq, data, lock_days):
            _anchor(root, record, params.registry.git_remote, _trail(store))
            return record
        time.sleep(0.01)  # another writer took this number: read the new head and take the next
    raise AuditError(f"audit trail: {_ATTEMPTS} writers in a row took the next record number in {store.where}")


def require(root: str | os.PathLike, action: str, object: str, allow: tuple[str, str], version: str | None = None,
            who: str | None = None, **detail: Any) -> str:
    """Check that `who` (default: the current identity) may do `allow` = (policy action, policy object); a refusal is
    recorded (outcome `denied`) and raised. Returns who.

    Raises:
        AccessDenied: the policy does not allow it. PolicyError: the policy cannot be used.
    """
    from llmops.governance import access, identity

    who = who or identity.current(root)
    try:
        access.load(root).require(who, *allow)
    except access.AccessDenied as exc:
        append(root, action, object, version, "denied", {**detail, "error": str(exc)}, who=who)
        raise
    return who


@contextmanager
def recorded(root: str | os.PathLike, action: str, object: str, version: str | None = None,
             who: str | None = None, allow: tuple[str, str] | None = None, **detail: Any) -> Iterator[dict[str, Any]]:
    """Record the action in the block when it ends: `ok`, or `failed` with its error (which propagates).

    With `allow` = (policy action, policy object), the access policy is asked first: a refusal is recorded as
    `denied` and raised, and the block does not run. Yields a dict for what is known only at the end:
    `note["version"]` and more detail.

    Raises:
        AccessDenied: the policy refused. AuditError: the action succeeded but its record could not be written.
    """
    if allow is not None:
        who = require(root, action, object, allow, version, who, **detail)
    note: dict[str, Any] = {"version": version, **detail}
    try:
        yield note
    except LlmopsError as exc:
        # the error's first line: the lines after it may quote the data (a failing row), and no record holds data
        failed = {**note, "error": (str(exc).splitlines() or [""])[0][:300]}
        try:
            append(root, action, object, failed.pop("version"), "failed", failed, who=who)
        except AuditError as lost:  # the action's own error is the one to show; say that its record is missing
            exc.args = (f"{exc} (and its audit record was not written: {lost})",)
        raise
    done = dict(note)
    append(root, action, object, done.pop("version"), "ok", done, who=who)


def _params(root: Path):
    from llmops.core.config import PARAMS_FILE, ConfigError, load_params, storage_for

    try:
        params = load_params(root / PARAMS_FILE)
    except ConfigError as exc:
        raise AuditError(f"audit trail: {exc}") from None
    return params.model_copy(update={"storage": storage_for(params.storage, root)})


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def check_writable(root: str | os.PathLike) -> None:
    """Refuse, before any work, a run whose stages could not record themselves: a stage whose record cannot be
    written fails after its outputs were made. A local trail's directory must be writable; an S3 trail listable
    (whether the bucket takes a write is known only by writing).

    Raises:
        AuditError: naming where, and why.
    """
    root = Path(root)
    store = _store(_params(root).storage, root)
    if isinstance(store, _Local):
        path = store.path
        while not path.exists():
            path = path.parent
        if not os.access(path, os.W_OK | os.X_OK):
            raise AuditError(f"audit trail: {store.where} cannot be written ({path} is not writable): each stage "
                             "records itself there; fix its permissions, or set storage.local_dir")
    else:
        store.seqs()  # AuditError: cannot list


def where(root: str | os.PathLike) -> str:
    """This checkout, as a record names it: host:path. A run's workspace (a git worktree of the checkout, under
    .llmops/workspaces/) acts for the checkout it belongs to, whose repository holds its anchors."""
    import socket

    from llmops.core.layout import WORKSPACES

    path = Path(root).resolve()
    for one in [path, *path.parents]:
        if one.parent.parts[-len(WORKSPACES.parts):] == WORKSPACES.parts:  # `one` is a workspace
            path = one.parents[len(WORKSPACES.parts)]
            break
    return f"{socket.gethostname()}:{path}"


def _anchor(root: Path, record: Record, remote: str | None, trail: str) -> None:
    """The record's hash in an annotated tag audit/<trail>/<seq>: a second copy of the head that the trail's writer
    alone cannot rewrite once it is pushed (a tag that exists is refused without --force)."""
    tag = f"{TAGS}/{trail}/{record.seq}"
    env = {**os.environ, "GIT_COMMITTER_NAME": record.who, "GIT_COMMITTER_EMAIL": "llmops-audit@localhost"}
    made = git.run(root, "tag", "-a", tag, "-m", f"sha256:{record.hash}", "HEAD", env=env)
    if made.returncode != 0:
        raise AuditError(f"audit trail: record {record.seq} was written but its anchor tag {tag} was not: "
                         f"{made.stderr.strip()}")
    if remote:  # this anchor and any an earlier push could not deliver
        refs = f"refs/tags/{TAGS}/{trail}/*"
        pushed = git.run(root, "push", "--quiet", remote, f"{refs}:{refs}")
        if pushed.returncode != 0:  # the record is written and anchored here; the next append pushes it
            logger.warning("audit trail: record %s is anchored in this clone but not yet on %s: %s", record.seq,
                           remote, (pushed.stderr.strip().splitlines() or ["no answer"])[-1])


# --- reading and verifying ------------------------------------------------------------------------------------------

def records(root: str | os.PathLike) -> Iterator[Record]:
    """Every record, oldest first (unverified: `verify` checks them)."""
    store = _store(_params(Path(root)).storage, Path(root))
    for seq in store.seqs():
        yield _load(store, seq)


def anchors(root: str | os.PathLike) -> dict[int, str]:
    """seq -> the hash its anchor tag holds, for this project's trail."""
    return _anchors(Path(root), _trail(_store(_params(Path(root)).storage, Path(root))))


def _anchors(root: Path, trail: str, refs: str = "refs/tags") -> dict[int, str]:
    listed = git.answer(root, "for-each-ref", "--format=%(refname:strip=-1) %(contents:subject)",
                        f"{refs}/{TAGS}/{trail}/") or ""
    found = {}
    for line in listed.splitlines():
        name, _, subject = line.partition(" ")
        if name.isdigit() and subject.startswith("sha256:"):
            found[int(name)] = subject.removeprefix("sha256:")
    return found


def _remote_anchors(root: Path, remote: str, trail: str) -> dict[int, str]:
    """The anchors on the registry's git remote, fetched aside (refs/llmops/anchors/...): this clone's tags stay."""
    aside = "refs/llmops/anchors"
    fetched = git.run(root, "fetch", "--quiet", "--no-tags", remote, f"+refs/tags/{TAGS}/{trail}/*:{aside}/{TAGS}/{trail}/*")
    if fetched.returncode != 0:
        raise AuditError(f"audit trail: cannot read the anchors on {remote} (registry.git_remote): "
                         f"{(fetched.stderr.strip().splitlines() or ['no answer'])[-1]}")
    return _anchors(root, trail, aside)


POLICY_CHANGE = "policy.change"


def record_policy(root: str | os.PathLike, why: str) -> Record:
    """Record the access policy file as it is now: who may do what from here on (`llmops trail policy`).

    The one recording must hold `change policy` under the policy last recorded, not under the file as it is now
    (whoever edited it could have given themselves that); the first record is judged by the file itself. The record
    keeps the policy's text and sha256: `verify` names any later change to the file that no record covers.

    Raises:
        AccessDenied: not allowed (recorded as denied). PolicyError: the file is no valid policy.
    """
    from llmops.governance import access, identity

    root = Path(root)
    text = access.path_of(root).read_text()
    access.load(root)  # the new policy must be one that works
    who = identity.current(root)
    last = _last_policy(records(root))
    judge = access.as_recorded(root, last.detail["text"]) if last is not None else access.load(root)
    sha = hashlib.sha256(text.encode()).hexdigest()
    try:
        judge.require(who, "change", "policy")
    except access.AccessDenied as exc:
        append(root, POLICY_CHANGE, "policy", None, "denied", {"why": why, "sha256": sha, "error": str(exc)}, who=who)
        raise
    return append(root, POLICY_CHANGE, "policy", None, "ok", {"why": why, "sha256": sha, "text": text}, who=who)


def _last_policy(trail: Iterable[Record]) -> Record | None:
    last = None
    for record in trail:
        if record.action == POLICY_CHANGE and record.outcome == "ok":
            last = record
    return last


@dataclass
class Verdict:
    records: int
    head: str | None
    anchored: int  # the highest sequence number an anchor confirms
    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(root: str | os.PathLike) -> Verdict:
    """Recompute the chain and check it against the anchors; each problem names the record where it is.

    Raises:
        AuditError: the trail's storage cannot be read.
    """
    root = Path(root)
    store = _store(_params(root).storage, root)
    seqs = store.seqs()
    problems: list[str] = []
    prev, expected, head = "", 1, None
    by_seq: dict[int, str] = {}
    read: list[Record] = []
    for seq in seqs:
        gap = seq != expected
        if gap:
            missing = f"record {expected}" if seq == expected + 1 else f"records {expected}-{seq - 1}"
            problems.append(f"{missing} removed (the chain jumps from {expected - 1} to {seq})")
        try:
            raw = json.loads(store.read(seq))
            record = Record(**raw)
        except (ValueError, TypeError) as exc:
            problems.append(f"record {seq} is not a record ({exc})")
            prev, expected = "", seq + 1
            continue
        if record.seq != seq:
            problems.append(f"record {seq} holds the contents of record {record.seq} (records were reordered)")
        if digest(record.body()) != record.hash:
            problems.append(f"record {seq} was changed after it was written (its hash does not match its contents)")
        elif record.prev != prev and not gap:  # after a gap, the gap is the problem
            problems.append(f"record {seq} does not follow record {seq - 1} (its `prev` is not that record's hash: "
                            "a record was replaced or reordered)")
        by_seq[seq] = record.hash
        read.append(record)
        prev, expected, head = record.hash, seq + 1, record.hash
    trail = _trail(store)
    marks = _anchors(root, trail)
    here = where(root)
    for record in read:  # every record this checkout wrote, it anchored: a missing tag was deleted
        if record.seq not in marks and record.detail.get("where") == here:
            problems.append(f"record {record.seq} has no anchor (tag {TAGS}/{trail}/{record.seq} was deleted)")
    remote = _params(root).registry.git_remote
    if remote:  # the shared repository's anchors: a clone's own tags can be moved, not those (without --force)
        theirs = _remote_anchors(root, remote, trail)
        for seq, anchored in sorted(theirs.items()):
            if seq in marks and marks[seq] != anchored:
                problems.append(f"record {seq}'s anchor here differs from the one on {remote}: this clone's tags "
                                "were moved")
        marks = {**marks, **theirs}  # the remote's word wins
    for seq, anchored in sorted(marks.items()):
        if seq not in by_seq:
            if not seqs or seq > seqs[-1]:
                problems.append(f"record {seq} is anchored (tag {TAGS}/{trail}/{seq}) but the trail ends at "
                                f"{seqs[-1] if seqs else 0}: records were cut off the end")
                break
        elif by_seq[seq] != anchored:
            problems.append(f"record {seq} differs from its anchor (tag {TAGS}/{trail}/{seq}): the chain was rewritten "
                            "from there")
            break
    policy = _last_policy(read)
    if policy is not None:
        from llmops.governance import access

        path = access.path_of(root)
        now = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
        if now != policy.detail.get("sha256"):
            problems.append(f"the access policy {path} is not the one record {policy.seq} recorded: it was changed "
                            "outside llmops (an admin records a change: `llmops trail policy --why ...`)")
    return Verdict(records=len(seqs), head=head, anchored=max(marks) if marks else 0, problems=problems)
