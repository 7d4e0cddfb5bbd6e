"""GDPR erasure: every trace of a data subject out of the datasets, their stored versions, the logs and the feedback.

`llmops erase --subject VALUE` (an admin's action, audited without the value itself):

1. finds every dataset file, in every version DVC tracks but the models dvc.yaml declares (each commit of the
   repository, the registry's included, and the workspace), that mentions the subject,
   reading each distinct file once from the DVC cache or the remote. Text is compared as
   read: JSON escapes decoded (`\u00d8lmann` is `Ølmann`), Unicode NFKC-normalised, case folded;
2. writes new versions of the current inputs without those rows (a `dvc add`-ed file, such as
   the monitor's corrections, or a local data.instructions/corpus file), rebuilds data/prepared
   through prepare_data and validate_data, pushes it, and commits it;
3. removes every file object that mentioned the subject from the DVC cache and the remote (with
   the cache's objects no version pins: the stages a failed run completed), so no old version can
   bring it back, and DVC's run-cache;
4. removes the lines of the request log, the rows of the feedback database (matched here, in
   Python, as everything else is; SQLite is vacuumed: deleted rows leave no trace in free pages),
   the monitor's and the explanations' outputs, failed runs' workspaces, and the Prefect flow runs (with their logs and
   artifacts) whose parameters, logs or artifacts mention it; reloads the project's running servers,
   which empties their response caches;
5. lists the registered model versions trained on affected data (`--retrain` starts the pipeline
   deployment on the new dataset version, as a git push would);
6. verifies: every file of the checkout (the DVC cache and the local databases included; model
   weights and files over 256 MiB excepted), every object of the remote, and every stored dataset
   version are read again, and any that still mentions the subject fails the erasure, named.

What it cannot do is rewrite git history that others have cloned: a git-tracked file that mentions
the subject is named, with the command that rewrites history, and the erasure fails.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sqlite3
import unicodedata
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from llmops.core import dvcyaml, git
from llmops.core.errors import LlmopsError

MIN_SUBJECT = 3  # characters: anything shorter would match half the data
TEXT = (".jsonl", ".json", ".csv", ".txt", ".text", ".md")
REBUILT = ("prepare_data", "validate_data")  # the stages an erasure runs again on the new data
SCAN_MAX_BYTES = 256 << 20  # the final scan reads files up to this size: datasets and logs, not model weights
WEIGHTS = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".png")  # never text: not scanned


class ErasureError(LlmopsError):
    """An erasure that cannot be done, that matched nothing, or that left a copy behind; the message says which, and
    what was done."""


@dataclass
class Erasure:
    subject_sha256: str
    objects: dict[str, str] = field(default_factory=dict)  # md5 -> one path it was stored at
    rows: int = 0  # rows removed from the current inputs
    log_lines: int = 0
    feedback_rows: int = 0
    monitor_files: int = 0  # the monitor's and the explanations' outputs
    workspaces: int = 0  # failed runs' workspaces removed
    flow_runs: int = 0  # Prefect flow runs deleted
    servers: int = 0  # running servers reloaded (their response caches emptied)
    versions: list[str] = field(default_factory=list)  # registered versions trained on affected data
    commit: str | None = None  # the new dataset version
    started: list[str] = field(default_factory=list)


_ESCAPE = re.compile(r"(?:\\u[0-9a-fA-F]{4})+")


def _as_read(text: str) -> str:
    """Text as a person reads it: JSON's \\uXXXX escapes decoded (surrogate pairs too), NFKC-normalised, case-folded.
    Files written with ensure_ascii (json.dumps' default) hold `\\u00d8lmann` for `Ølmann`."""
    def decode(run: re.Match) -> str:
        units = bytes.fromhex("".join(run.group(0)[i + 2:i + 6] for i in range(0, len(run.group(0)), 6)))
        return units.decode("utf-16-be", errors="replace")

    return unicodedata.normalize("NFKC", _ESCAPE.sub(decode, text)).casefold()


def _mentions(subject: str):
    """text -> whether it mentions the subject, both read as a person reads them (`_as_read`)."""
    wanted = _as_read(subject)
    return lambda text: wanted in _as_read(text)


_git = partial(git.out, error=ErasureError)  # git's failures as erasure's own error


def _tracked_files(root: Path, rev: str | None) -> dict[str, str]:
    """path -> md5 of every DVC-cached text file at `rev` (None: the workspace) but the models dvc.yaml declares
    (`type: model`): the datasets (the stages' and any `dvc add`-ed), and the reports that quote their rows (evaluate's
    samples and baseline answers)."""
    from dvc.api import DVCFileSystem

    models = tuple(f"{m.strip('/')}/" for d in dvcyaml.stages(root).values() for m in d.models)
    found = DVCFileSystem(str(root), rev=rev).find("/", detail=True)
    return {path.lstrip("/"): info["dvc_info"]["md5"] for path, info in found.items()  # relative to the root
            if (info.get("dvc_info") or {}).get("md5") and path.endswith(TEXT)
            and not f"{path.lstrip('/')}/".startswith(models)}


def scan(root: Path, mentions) -> tuple[dict[str, str], dict[str, set[str]]]:
    """Every stored dataset file object that mentions the subject (md5 -> a path), and each revision's md5s."""
    from dvc.api import DVCFileSystem

    revs = [None, *_git(root, "rev-list", "--all").split()]
    by_rev: dict[str | None, set[str]] = {}
    affected: dict[str, str] = {}
    seen: set[str] = set()
    for rev in revs:
        files = _tracked_files(root, rev)
        by_rev[rev] = set(files.values())
        fs = None
        for path, md5 in files.items():
            if md5 in seen:
                continue
            seen.add(md5)
            fs = fs or DVCFileSystem(str(root), rev=rev)
            try:
                text = fs.read_bytes(path).decode("utf-8", errors="replace")
            except Exception as exc:  # an object neither cached nor on the remote: it cannot hold anything
                if "not in cache" in str(exc).lower() or isinstance(exc, FileNotFoundError):
                    continue
                raise ErasureError(f"{path} at {rev or 'the workspace'} cannot be read: {exc}") from None
            if mentions(text):
                affected[md5] = path
    affected.update(_unpinned_objects(root, mentions, seen))
    return affected, by_rev


def _unpinned_objects(root: Path, mentions, pinned: set[str]) -> dict[str, str]:
    """Objects of the DVC cache that no version pins and that mention the subject: the outputs of stages that a failed
    run completed (DVC's run-cache keeps them for the next run)."""
    found = {}
    top = root / ".dvc/cache/files/md5"
    for path in sorted(top.glob("??/*")) if top.is_dir() else []:
        md5 = path.parent.name + path.name
        if md5 in pinned or path.suffix == ".dir" or path.stat().st_size > SCAN_MAX_BYTES:
            continue
        if _file_mentions(path, mentions):
            found[md5] = f"{path.relative_to(root)} (no version pins it: a failed run's output)"
    return found


def _cleaned(path: Path, mentions, remove: bool = True) -> int:
    """A text file's lines that mention the subject: counted, and with `remove`, written out (atomically)."""
    from llmops.core.fs import write_text

    # lines end at "\n" alone: a JSON string may hold a raw U+2028, where splitlines() would cut a row in two
    lines = path.read_text(encoding="utf-8", errors="replace").split("\n")
    kept = [line for line in lines if not mentions(line)]
    if remove and len(kept) != len(lines):
        write_text(path, "\n".join(kept))
    return len(lines) - len(kept)


def _object_paths(md5: str) -> str:
    return f"files/md5/{md5[:2]}/{md5[2:]}"


def _remove_objects(root: Path, objects: dict[str, str], storage) -> None:
    """The objects out of this project's DVC cache and its remote: no version can bring them back."""
    for md5 in objects:
        (root / ".dvc/cache" / _object_paths(md5)).unlink(missing_ok=True)
    if storage.remote == "s3":
        from llmops.core.storage import explain, s3_client

        client, prefix = s3_client(storage), storage.prefix.strip("/")
        for md5 in objects:
            key = "/".join(p for p in (prefix, _object_paths(md5)) if p)
            try:
                client.delete_object(Bucket=storage.bucket, Key=key)
            except Exception as exc:
                raise ErasureError(str(explain(exc, f"erase: cannot delete s3://{storage.bucket}/{key}", storage))) \
                    from None
    else:
        base = (root / Path(storage.url).expanduser()).resolve()
        for md5 in objects:
            (base / _object_paths(md5)).unlink(missing_ok=True)


def _log_files(root: Path, params) -> list[Path]:
    """The request log's files on this machine (the servers' own, and monitor.request_log when it is local)."""
    from llmops.core.layout import REQUESTS as LOG_DIR

    tops = {root / LOG_DIR}
    if params.monitor.request_log and "://" not in params.monitor.request_log:
        tops.add(root / params.monitor.request_log)
    return sorted(path for top in tops if top.is_dir() for path in top.rglob("*.jsonl"))


def _local_outputs(root: Path, mentions, remove: bool) -> int:
    """The monitor's reports and queue, and the explanations (`llmops explain`), that mention the subject: lines out
    of JSON lines, other files removed (the next monitor run writes them again)."""
    from llmops.core.layout import EXPLAIN as EXPLAINED
    from llmops.core.layout import MONITOR as MONITORED

    touched = 0
    files = [p for top in (MONITORED, EXPLAINED) if (root / top).is_dir() for p in sorted((root / top).rglob("*"))]
    for path in files:
        if not path.is_file() or not mentions(path.read_bytes().decode("utf-8", errors="replace")):
            continue
        if remove and path.suffix == ".jsonl":
            _cleaned(path, mentions)
        elif remove:
            path.unlink()
        touched += 1
    return touched


def _workspaces(root: Path, mentions, remove: bool) -> int:
    """Failed runs' workspaces (kept for inspection) with a file that mentions the subject: counted, and with `remove`,
    removed whole (one a run is building in is left, and the final scan names it)."""
    from llmops.pipeline import workspaces

    found = [ws for ws in workspaces.kept(root)
             if any(_file_mentions(path, mentions) for path in ws.path.rglob("*") if path.is_file()
                    and path.suffix not in WEIGHTS and path.stat().st_size <= SCAN_MAX_BYTES)]
    return sum(workspaces.discard(root, ws) for ws in found) if remove else len(found)


def _feedback(root: Path, mentions, remove: bool) -> int:
    """Rows of the feedback database (requests, feedback, reviews) about requests that mention the subject: counted,
    and with `remove`, deleted. Rows are matched here, as every other text is: SQL's LIKE folds only ASCII case
    (SQLite's lower() leaves Ø alone), knows no Unicode normalisation, and reads % and _ in a subject as wildcards."""
    from sqlalchemy import delete, func, select

    from llmops.serving.feedback import Store, database_url, feedback, requests, reviews

    store = Store(database_url(root))
    texts = ((requests, ("prompt", "answer")), (feedback, ("correction", "comment")), (reviews, ("correction",)))
    with store.engine.begin() as conn:
        ids = {row[0] for table, columns in texts
               for row in conn.execute(select(table.c.request_id, *(table.c[c] for c in columns)))
               if any(text and mentions(text) for text in row[1:])}
        chunks = [sorted(ids)[i:i + 500] for i in range(0, len(ids), 500)]
        if not remove:
            return sum(conn.execute(select(func.count()).select_from(table).where(table.c.request_id.in_(chunk)))
                       .scalar() for table in (feedback, reviews, requests) for chunk in chunks)
        removed = sum(conn.execute(delete(table).where(table.c.request_id.in_(chunk))).rowcount
                      for table in (feedback, reviews, requests) for chunk in chunks)
    store.engine.dispose()
    if removed and store.url.startswith("sqlite:///"):  # deleted rows linger in free pages and the WAL until then
        db = sqlite3.connect(store.url.removeprefix("sqlite:///"))
        try:
            db.execute("VACUUM")
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            db.close()
    return removed


async def _pages(read, **filters) -> list:
    """Every item a Prefect client read method returns, 200 at a time."""
    items: list = []
    while page := await read(**filters, limit=200, offset=len(items)):
        items += page
    return items


def _flow_runs(root: Path, mentions, remove: bool) -> int:
    """Prefect flow runs whose parameters, logs or artifacts mention the subject (a subject's file named as a
    parameter, a stage that printed a row): counted, and with `remove`, deleted with their artifacts and logs.

    Prefect's API deletes a flow run (its task runs and states with it) and an artifact, never a log: the project's
    own Prefect database (.llmops/prefect) then loses those logs here, and is vacuumed. A Prefect server of
    PREFECT_API_URL keeps its logs; `verify` names them.
    """
    import asyncio

    from llmops.pipeline.prefect_api import STATE_DIR, prefect_api

    db = root / STATE_DIR / "prefect.db"
    external = bool(os.environ.get("PREFECT_API_URL"))
    if not external and not any(_file_mentions(f, mentions) for f in db.parent.glob(f"{db.name}*")):
        return 0  # (its write-ahead log and free pages included: a vacuum below clears them)

    async def find(url: str) -> tuple[set, set[str], int]:
        from prefect.client.orchestration import get_client
        from prefect.settings import PREFECT_API_URL, temporary_settings

        # this server's URL, explicitly: Prefect keeps the settings it read first, and an erasure starts the
        # project's server more than once
        with temporary_settings(updates={PREFECT_API_URL: url}):
            async with get_client() as client:
                return await _found(client, mentions, remove)

    with prefect_api(root) as url:
        runs, logs, stray = asyncio.run(find(url))
    if remove and not external and db.is_file():
        database = sqlite3.connect(db)
        try:
            with database:  # the logs of the deleted runs, and any other that mentions the subject
                gone = [str(r) for r in runs]
                for i in range(0, len(gone), 500):
                    chunk = gone[i:i + 500]
                    database.execute(f"DELETE FROM log WHERE flow_run_id IN ({','.join('?' * len(chunk))})", chunk)
                for one in logs:
                    database.execute("DELETE FROM log WHERE id = ?", (one,))
                # Prefect's events (a task run's state change carries its message): no API deletes them
                events = [row[0] for row in database.execute("SELECT id, event, resource, related, payload FROM events")
                          if mentions(" ".join(str(value) for value in row[1:]))]
                for one in events:
                    database.execute("DELETE FROM event_resources WHERE event_id = ?", (one,))
                    database.execute("DELETE FROM events WHERE id = ?", (one,))
            database.execute("VACUUM")
            database.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            database.close()
    return len(runs) + stray


async def _found(client, mentions, remove: bool) -> tuple[set, set[str], int]:
    """(flow run ids, log ids, matches outside any run) of what mentions the subject; deleted with `remove`."""
    runs = {r.id for r in await _pages(client.read_flow_runs)
            if mentions(json.dumps(r.parameters, ensure_ascii=False, default=str))}
    logs = [log for log in await _pages(client.read_logs) if mentions(log.message)]
    artifacts = [a for a in await _pages(client.read_artifacts)
                 if mentions(json.dumps([a.data, a.description], ensure_ascii=False, default=str))]
    runs |= {x.flow_run_id for x in [*logs, *artifacts] if x.flow_run_id}
    if remove:
        for artifact in artifacts:
            await client.delete_artifact(artifact.id)
        for run in runs:
            await client.delete_flow_run(run)
    return runs, {str(log.id) for log in logs}, sum(not x.flow_run_id for x in [*logs, *artifacts])


def _reload_servers(root: Path) -> int:
    """Reload the project's running servers: a reload empties a server's response cache, where an answer to the
    subject may be kept."""
    from llmops.serving import instances as servers

    running = servers.running(root)
    for server in running:
        try:
            servers.reload(root, server, timeout_s=600)
        except servers.ServerError as exc:
            raise ErasureError(f"could not reload the server at {server.url} to empty its response cache: {exc}; "
                               "stop it (`llmops serve stop`) and erase again") from None
    return len(running)


def _file_mentions(path: Path, mentions) -> bool:
    return mentions(path.read_bytes().decode("utf-8", errors="replace"))


def verify(root: Path, params, mentions) -> list[str]:
    """Where the subject still is: every file of the checkout (the DVC cache, the request log and the local databases
    among them; model weights and files over SCAN_MAX_BYTES excepted), every object of the DVC remote, the feedback
    database, Prefect's flow runs, and every stored version of a dataset file (read from the cache or the remote)."""
    from llmops.core.config import storage_for

    found = []
    for path in sorted(root.rglob("*")):
        parts = path.relative_to(root).parts
        if parts[0] == ".git" or not path.is_file() or path.suffix in WEIGHTS \
                or path.stat().st_size > SCAN_MAX_BYTES or any((root.joinpath(*parts[:i]) / "pyvenv.cfg").is_file()
                                                                 for i in range(1, len(parts))):
            continue
        if _file_mentions(path, mentions):
            found.append(str(path.relative_to(root)))
    storage = storage_for(params.storage, root)
    for name, data in _remote_objects(root, storage):
        if mentions(data.decode("utf-8", errors="replace")):
            found.append(name)
    if _feedback(root, mentions, remove=False):
        found.append("the feedback database")
    if os.environ.get("PREFECT_API_URL") and _flow_runs(root, mentions, remove=False):
        found.append(f"the Prefect server at {os.environ['PREFECT_API_URL']}")
    return found


def _remote_objects(root: Path, storage):
    """(name, bytes) of every object of the DVC remote up to SCAN_MAX_BYTES."""
    if storage.remote == "s3":
        from llmops.core.storage import explain, s3_client

        client, prefix = s3_client(storage), storage.prefix.strip("/")
        try:
            pages = client.get_paginator("list_objects_v2").paginate(Bucket=storage.bucket,
                                                                       Prefix=f"{prefix}/" if prefix else "")
            for page in pages:
                for item in page.get("Contents", []):
                    if item["Size"] <= SCAN_MAX_BYTES:
                        body = client.get_object(Bucket=storage.bucket, Key=item["Key"])["Body"].read()
                        yield f"s3://{storage.bucket}/{item['Key']}", body
        except Exception as exc:
            raise ErasureError(str(explain(exc, "erase: cannot read the remote to verify it", storage))) from None
        return
    base = (root / Path(storage.url).expanduser()).resolve()
    for path in sorted(base.rglob("*")) if base.is_dir() else []:
        if path.is_file() and path.stat().st_size <= SCAN_MAX_BYTES:
            yield str(path), path.read_bytes()


def _inputs(root: Path, params) -> list[Path]:
    """The current input files the pipeline reads from this checkout: the dvc-added files (their .dvc files in git),
    and the local files params name for prepare_data (data.instructions, eval_instructions, corpus, corrections: the
    fields config.py marks read_by("prepare_data"))."""
    from llmops.core.config import stage_inputs

    found = {(root / p).with_suffix("") for p in _git(root, "ls-files", "-z", "*.dvc").split("\0") if p}
    for _, value in stage_inputs(params).get("prepare_data", []):
        if "://" not in value:
            found.add((root / value).resolve())
    return sorted(p for p in found if p.is_file())


def erase(root: str | os.PathLike, subject: str, retrain: bool = False) -> Erasure:
    """Erase `subject` everywhere this project keeps data (see the module's docstring). Audited.

    Raises:
        ErasureError: a subject too short, one that nothing mentions, one that git history holds, or a step that
            failed (the message says which, and what was already done).
        AccessDenied: the identity may not erase.
    """
    from llmops.core.config import PARAMS_FILE, load_params, storage_for, with_changes, write_params
    from llmops.governance import audit
    from llmops.pipeline import remote
    from llmops.pipeline.repro import dvc
    from llmops.registry import versions as registry

    root = Path(root).resolve()
    subject = subject.strip()
    if len(subject) < MIN_SUBJECT:
        raise ErasureError(f"the subject must have at least {MIN_SUBJECT} characters (it is matched as text, "
                           "case-insensitively, everywhere)")
    result = Erasure(subject_sha256=hashlib.sha256(subject.encode()).hexdigest())
    with audit.recorded(root, "data.erase", "data", allow=("erase", "data"),
                        subject_sha256=result.subject_sha256) as note:
        params = load_params(root / PARAMS_FILE)
        mentions = _mentions(subject)
        found = git.answer(root, "grep", "-l", "-i", "-F", "-e", subject, *_git(root, "rev-list", "--all").split(),
                           "--")  # exit status 1: no match
        in_git = sorted(set((found or "").split()))
        if in_git:
            paths = sorted({line.split(":", 1)[1] for line in in_git})
            raise ErasureError(f"git history holds the subject in {', '.join(paths)}: llmops does not rewrite shared "
                               "history; remove it with `git filter-repo --replace-text` and force-push, then erase")
        result.objects, by_rev = scan(root, mentions)
        inputs = [p for p in _inputs(root, params) if _cleaned(p, mentions, remove=False)]
        logs = [p for p in _log_files(root, params) if _cleaned(p, mentions, remove=False)]
        if not (result.objects or inputs or logs or _feedback(root, mentions, remove=False)
                or _local_outputs(root, mentions, remove=False) or _workspaces(root, mentions, remove=False)
                or _flow_runs(root, mentions, remove=False)):
            elsewhere = verify(root, params, mentions)
            raise ErasureError("nothing in the datasets (any version), the request log, the feedback, the monitor's "
                               "or the explanations' outputs or the Prefect runs mentions the subject; nothing was "
                               "changed" + (f"; but it is still in {len(elsewhere)} places: {', '.join(elsewhere[:10])}"
                                            " (not written by llmops: remove those by hand)" if elsewhere else ""))
        pointers = [p.with_name(p.name + ".dvc") for p in inputs if p.with_name(p.name + ".dvc").is_file()]
        for path in inputs:
            result.rows += _cleaned(path, mentions)
        corrections = (root / params.data.corrections).resolve() if params.data.corrections else None
        if corrections in inputs and not corrections.read_text(encoding="utf-8").strip():
            # every correction was the subject's: the data has none now (prepare_data refuses an empty file)
            write_params(root / PARAMS_FILE, with_changes(params, {"data.corrections": None}))
            corrections.unlink()
            corrections.with_name(corrections.name + ".dvc").unlink(missing_ok=True)
        for pointer in pointers:
            if pointer.with_suffix("").is_file():
                dvc(root, "add", "--quiet", str(pointer.with_suffix("").relative_to(root)), what="dvc add")
        rebuilt = bool(set(result.objects) & set().union(*by_rev.values()))  # a version pins one: a new version
        if rebuilt:
            dvc(root, "repro", "--quiet", *REBUILT, what="dvc repro")
        storage = storage_for(params.storage, root)
        later = [root / p for d in dvcyaml.stages(root).values() if d.name not in REBUILT for p in d.data]
        for path in {root / p for p in result.objects.values()}:  # later stages' reports that still quote it
            if path.is_file() and any(path.is_relative_to(out) for out in later) \
                    and _cleaned(path, mentions, remove=False):
                _cleaned(path, mentions) if path.suffix == ".jsonl" else path.unlink()  # the next run writes it again
        _remove_objects(root, result.objects, storage)
        if result.objects:  # DVC's run-cache: entries naming removed objects (and their params' values) go too
            shutil.rmtree(root / ".dvc/cache/runs", ignore_errors=True)
        result.log_lines = sum(_cleaned(path, mentions) for path in logs)
        result.feedback_rows = _feedback(root, mentions, remove=True)
        result.monitor_files = _local_outputs(root, mentions, remove=True)
        result.workspaces = _workspaces(root, mentions, remove=True)
        result.flow_runs = _flow_runs(root, mentions, remove=True)
        result.servers = _reload_servers(root)
        if rebuilt or result.rows:
            remote.push(root, storage)  # the new version to the remote, as a run's push does
            changed = ["dvc.lock", PARAMS_FILE, *(str(p.relative_to(root)) for p in pointers)]
            changed += [str(p.relative_to(root)) for p in inputs if p.with_name(p.name + ".dvc") not in pointers
                        and git.answer(root, "ls-files", "--", str(p.relative_to(root)))]
            _git(root, "add", "-A", "--", *changed)
            if _git(root, "diff", "--cached", "--name-only", "--", *changed).strip():
                _git(root, "commit", "-q", "-m", f"llmops erase: a data subject (sha256 {result.subject_sha256[:12]}) "
                     f"out of the datasets ({len(result.objects)} stored files, {result.rows} input rows)", "--",
                     *changed)
                result.commit = _git(root, "rev-parse", "HEAD").strip()
        affected = set(result.objects)
        for version in registry.versions(root):
            if by_rev.get(version.commit, set()) & affected:
                result.versions.append(version.version)
        note.update(objects=len(result.objects), rows=result.rows, log_lines=result.log_lines,
                    feedback_rows=result.feedback_rows, monitor_files=result.monitor_files, workspaces=result.workspaces,
                    flow_runs=result.flow_runs, servers=result.servers, versions=result.versions,
                    commit=result.commit)
        remains = verify(root, params, mentions)
        remains += [f"{path} (a stored version)" for path in scan(root, mentions)[0].values()]
        if remains:
            raise ErasureError(f"erased what it found, but the subject is still in {len(remains)} places: "
                               f"{', '.join(remains[:10])}{' ...' if len(remains) > 10 else ''}; remove those, "
                               "then erase again")
        if retrain and result.versions and result.commit:
            result.started = _retrain(root, params, result.commit)
    return result


def _retrain(root: Path, params, commit: str) -> list[str]:
    from llmops.pipeline import triggers

    branch = _git(root, "symbolic-ref", "--quiet", "--short", "HEAD").strip()
    parent = _git(root, "rev-parse", f"{commit}^").strip()
    try:
        return triggers.on_push(str(root), branch, params.monitor.retrain.deployment,
                                [(parent, commit, f"refs/heads/{branch}")])
    except triggers.TriggerError as exc:
        raise ErasureError(f"the subject is erased and the new dataset version is commit {commit[:12]}, but its "
                           f"retraining could not start: {exc}; build it with `llmops run`") from None


def summary(result: Erasure) -> str:
    lines = [f"erased the subject (sha256 {result.subject_sha256[:12]}...):",
             f"  {len(result.objects)} stored dataset files removed from the DVC cache and the remote",
             f"  {result.rows} rows removed from the current inputs"
             + (f"; new dataset version: commit {result.commit[:12]}" if result.commit else ""),
             f"  {result.log_lines} request log lines, {result.feedback_rows} feedback rows, "
             f"{result.monitor_files} monitor and explanation outputs, {result.workspaces} failed runs' workspaces, "
             f"{result.flow_runs} Prefect runs removed",
             f"  {result.servers} running servers reloaded (their response caches emptied)",
             "  verified: no copy left in the checkout, the DVC cache, the remote, the feedback or the stored "
             "dataset versions"]
    if result.versions:
        lines.append(f"  model versions trained on affected data: {', '.join(result.versions)}"
                     + ("" if result.started else " (retrain: `llmops erase ... --retrain`, or `llmops run`)"))
    lines += [f"  {line}" for line in result.started]
    return "\n".join(lines)

