"""`llmops erase` on a project whose data holds a subject in the forms a careless search misses (a JSON escape, another
Unicode form and case, SQL wildcards in the value), in every place a copy lands; it ends with a scan of the checkout,
the DVC cache and the remote, and fails, naming the place, where a copy remains. (The drill over a whole run with S3
and a live server: tests/test_drills.py.)"""

from __future__ import annotations

import json
import unicodedata
from datetime import datetime, timezone

import pytest

from conftest import BIN, base_env, run, set_params

SUBJECT = "Øl" + "männ_50%"  # built here, so the project's copy of this file never names it
UPPER = "JAN " + SUBJECT.upper()  # another case


def _rows(n: int) -> list[dict]:
    return [{"prompt": f"What is {i} + {i}?", "response": str(2 * i)} for i in range(n)]


def test_erasure_finds_every_form_and_proves_no_copy_remains(project):
    from llmops.serving.feedback import Store, database_url

    rows = _rows(40)
    rows[3] = {"prompt": f"Who wrote to Jan {SUBJECT}?", "response": "a friend"}  # stored escaped: \\u00d8l
    rows[7] = {"prompt": "Say the name.", "response": unicodedata.normalize("NFD", UPPER)}  # Ä as A + U+0308
    mine = project / "mine.jsonl"
    mine.write_text("".join(json.dumps(r) + "\n" for r in rows))  # ensure_ascii: the subject is not there as text
    assert SUBJECT not in mine.read_text() and "\\u00d8" in mine.read_text()
    set_params(project, "data.instructions=mine.jsonl")
    run(["dvc", "repro", "validate_data"], project)
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "my data"], project)
    run(["dvc", "push", "-q"], project)
    before = json.loads((project / "reports/inputs/prepare_data.json").read_text())
    # the subject in the feedback database, a request log line, an explanation, and the monitor's outputs
    store = Store(database_url(project))
    now = datetime.now(timezone.utc)
    store.record_request("cmpl-1", now, None, f"about {SUBJECT.lower()}", "ok")
    store.record_request("cmpl-2", now, None, "about ølmännX50x", "ok")  # % and _ are not wildcards: kept
    log = project / ".llmops/serve/requests/date=2026-12-07/host-1.jsonl"
    log.parent.mkdir(parents=True)
    log.write_text(json.dumps({"prompt": f"hi {SUBJECT}"}) + "\n" + json.dumps({"prompt": "hi"}) + "\n")
    explained = project / ".llmops/explain/20261207-120000/explanation.json"
    explained.parent.mkdir(parents=True)
    explained.write_text(json.dumps({"prompt": f"who is {SUBJECT}", "tokens": []}, indent=2))

    out = run([str(BIN / "llmops"), "erase", "--subject", SUBJECT.lower()], project).stdout
    assert "2 rows removed from the current inputs" in out and "new dataset version: commit" in out, out
    assert "1 request log lines, 1 feedback rows, 1 monitor and explanation outputs" in out, out
    assert "verified: no copy left" in out
    # the rebuild really rebuilt: new fingerprints, new prepared data, committed
    assert json.loads((project / "reports/inputs/prepare_data.json").read_text()) != before
    prepared = "".join((project / f"data/prepared/{s}.jsonl").read_text() for s in ("train", "eval"))
    assert prepared.count("\n") == 38 and "00d8" not in prepared.lower()
    assert run(["git", "status", "--porcelain", "--", "dvc.lock", "mine.jsonl"], project).stdout == ""
    assert not explained.exists() and log.read_text().count("\n") == 1
    with store.engine.connect() as conn:
        from sqlalchemy import select

        from llmops.serving.feedback import requests
        assert [r[0] for r in conn.execute(select(requests.c.request_id))] == ["cmpl-2"]

    # a copy the erasure does not know of (a file someone saved by hand): it fails, naming it
    (project / "notes").mkdir()
    (project / "notes/export.txt").write_text(f"call Jan {SUBJECT} back\n")
    again = run([str(BIN / "llmops"), "erase", "--subject", SUBJECT], project, check=False)
    assert again.returncode == 1 and "still in 1 places: notes/export.txt" in again.stderr, again.stderr
    # and beside something it erases: it erases that, then fails naming the copy it could not
    log.write_text(json.dumps({"prompt": f"hi {SUBJECT}"}) + "\n")
    again = run([str(BIN / "llmops"), "erase", "--subject", SUBJECT], project, check=False)
    assert again.returncode == 1 and "erased what it found, but the subject is still in 1 places: notes/export.txt" \
        in again.stderr, again.stderr
    assert log.read_text() == ""


@pytest.mark.services
def test_erasure_removes_the_prefect_runs_that_name_the_subject(project):
    """A run whose parameters or log name the subject (a stage that printed a row): the run goes, with its logs, and
    the project's Prefect database keeps no copy in its free pages."""
    import subprocess
    import sys

    script = (
        "from llmops.pipeline.prefect_api import prefect_api\n"
        "with prefect_api('.'):\n"
        "    from prefect import flow, get_run_logger\n"
        "    @flow(name='note')\n"
        "    def note(text: str):\n"
        "        get_run_logger().info('a row about %s', text)\n"
        f"    note(text={SUBJECT!r})\n"
        "    note(text='nobody')\n")
    subprocess.run([sys.executable, "-c", script], cwd=project, env=base_env(), check=True, capture_output=True)
    db = project / ".llmops/prefect/prefect.db"
    assert SUBJECT.encode() in b"".join(p.read_bytes() for p in db.parent.glob("prefect.db*"))
    out = run([str(BIN / "llmops"), "erase", "--subject", SUBJECT], project).stdout
    assert "1 Prefect runs removed" in out and "verified: no copy left" in out, out
    left = b"".join(p.read_bytes() for p in db.parent.glob("prefect.db*"))
    assert SUBJECT.encode() not in left and b"nobody" in left  # the other run stays


@pytest.mark.services
def test_erasure_reaches_what_a_failed_run_left_outside_the_checkout(project):
    """A run that fails keeps its workspace, and the stages it completed are in the DVC cache (for DVC's run-cache)
    though no version pins them: erasure removes both, and the run-cache."""
    subject = "Quix" + "by Zelenka"
    rows = _rows(40)
    rows[5] = {"prompt": "Who asked?", "response": f"{subject}, write to q@example.org"}  # an email: validation fails
    (project / "mine.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = run([str(BIN / "llmops"), "run", "--no-push", "-S", "data.instructions=mine.jsonl",
                "-S", "governance.data_licence=MIT"], project, check=False)
    assert proc.returncode == 1 and "validate_data failed" in proc.stderr, proc.stderr
    assert not (project / "data/prepared").exists()  # nothing landed in the checkout
    assert (project / ".dvc/cache/runs").is_dir()  # prepare_data's outputs, kept for the next run
    (project / "mine.jsonl").unlink()  # the subject's data is gone from the checkout, not from what the run left

    out = run([str(BIN / "llmops"), "erase", "--subject", subject.lower()], project).stdout
    assert "1 failed runs' workspaces" in out and "verified: no copy left" in out, out
    assert "no workspaces" in run([str(BIN / "llmops"), "workspaces"], project).stdout
    assert not (project / ".dvc/cache/runs").exists()
