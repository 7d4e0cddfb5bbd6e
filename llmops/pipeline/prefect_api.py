"""The Prefect API a `llmops run` reports to: the server at PREFECT_API_URL, or one of the project's own.

Why not Prefect's ephemeral server: it waits 20 s for its server to start (a busy
2-core machine needs more), it shares ~/.prefect between every clone on the machine,
and it runs in our process group, so Ctrl-C kills it first and the flow then
retries the dead API for minutes. Ours keeps its state in the checkout
(.llmops/prefect), waits as long as a slow start needs, lives in a session of
its own so Ctrl-C reaches only the run, and is stopped when the run ends (by the
kernel, if the run is killed outright).
"""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import urllib.request
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Callable, Iterator

from llmops.core import fs
from llmops.core.errors import LlmopsError
from llmops.core.layout import PREFECT as STATE_DIR
from llmops.core.procs import Exited, die_with_parent, wait_until
from llmops.serving.instances import free_port

START_TIMEOUT_S = 300
# Databases this machine's Prefect versions migrated, one a version: a server started on a new database migrates it
# first (about 6 s of CPU on 2 cores, twice what the rest of its start costs), so a project's first run, and every run
# in a fresh clone or workspace, starts on a copy instead.
TEMPLATES = Path("~/.cache/llmops/prefect").expanduser()

OWN = "LLMOPS_OWN_PREFECT_API"  # set while the API is this run's own server, which no other run shares


class PrefectUnavailable(LlmopsError):
    """No Prefect API to report to; the message says what to do."""


def _healthy(api_url: str, timeout: float = 5) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=timeout) as resp:
            return resp.status == 200
    except OSError:
        return False


def _drain() -> None:
    """Send the logs and events Prefect still holds before the server goes (else: "Error logging to API")."""
    if "prefect" not in sys.modules:
        return
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        worker.drain_all(timeout=30)


@contextmanager
def prefect_api(root: str | os.PathLike) -> Iterator[str]:
    """Make PREFECT_API_URL point at a live server for the block; yields its URL.

    Call before Prefect is imported: Prefect reads its settings from the environment.

    Raises:
        PrefectUnavailable: the configured server does not answer, or ours did not start.
    """
    url = os.environ.get("PREFECT_API_URL")
    if url:
        if not _healthy(url, timeout=15):
            raise PrefectUnavailable(
                f"no Prefect server answers at PREFECT_API_URL={url}; start it (`prefect server start`) "
                "or unset PREFECT_API_URL to use a local one for this run")
        yield url
        return
    home = Path(root).resolve() / STATE_DIR
    home.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PREFECT_HOME", str(home))
    keep_migrated = seeded(Path(os.environ["PREFECT_HOME"]) / "prefect.db")
    port = free_port("127.0.0.1")
    url = f"http://127.0.0.1:{port}/api"
    env = dict(os.environ, PREFECT_UI_ENABLED="0", PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT__SERVER_EPHEMERAL="1")  # no UI and fewer background services, as Prefect's own
    log = home / "server.log"
    with open(log, "w") as out:
        server = subprocess.Popen([sys.executable, "-m", "llmops.pipeline.prefect_api", str(port)], env=env, stdout=out,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    try:
        try:
            healthy = wait_until(lambda: _healthy(url, timeout=2), START_TIMEOUT_S, interval_s=0.5, proc=server)
        except Exited as exc:
            raise PrefectUnavailable(f"the local Prefect server exited with code {exc.returncode} while starting; "
                                     f"its log is {log}") from None
        if not healthy:
            raise PrefectUnavailable(
                f"the local Prefect server did not answer within {START_TIMEOUT_S} s (log: {log}); "
                "the machine may be overloaded: try again, or point PREFECT_API_URL at a running server")
        keep_migrated()
        os.environ["PREFECT_API_URL"] = url
        os.environ[OWN] = url
        yield url
    finally:
        _drain()
        if os.environ.get("PREFECT_API_URL") == url:
            del os.environ["PREFECT_API_URL"]
        os.environ.pop(OWN, None)
        server.terminate()
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def _template() -> Path:
    from importlib.metadata import version

    return TEMPLATES / f"prefect-{version('prefect')}.db"


def seeded(db: Path) -> Callable[[], None]:
    """Start a server's new database `db` (Prefect's default, in PREFECT_HOME) on a copy of one this Prefect version
    migrated before; returns what to call once that server answers, which keeps a copy of the database it migrated
    where there was none to start from. Nothing to do for a database that exists, or one configured elsewhere."""
    if "PREFECT_API_DATABASE_CONNECTION_URL" in os.environ or db.exists() or _from_template(db):
        return lambda: None
    return lambda: _save_template(db)


def _from_template(db: Path) -> bool:
    """Put a copy of the migrated database this Prefect version left (`_save_template`) at `db`; False if there is
    none yet."""
    template = _template()
    if not template.is_file():
        return False
    with fs.writing(db) as tmp:  # (in a PREFECT_HOME not made yet, made, as Prefect would make it)
        shutil.copyfile(template, tmp)
    return True


def _save_template(db: Path) -> None:
    """Keep a copy of `db`, which a server started on this Prefect version has just migrated, for `_from_template`. A
    consistent copy (SQLite's backup) though the server runs; one that cannot be made is no error: the next new
    database migrates again."""
    try:
        with fs.writing(_template()) as tmp, closing(sqlite3.connect(db, timeout=30)) as src, \
                closing(sqlite3.connect(tmp)) as dst:
            src.backup(dst)
    except (OSError, sqlite3.Error):
        pass


def _serve(port: int) -> None:
    """The server process: Prefect's API app under uvicorn, as Prefect's own temporary server runs it."""
    die_with_parent(signal.SIGTERM)
    import uvicorn

    uvicorn.run("prefect.server.api.server:create_app", factory=True, host="127.0.0.1", port=port,
                log_level="error", lifespan="on")


if __name__ == "__main__":
    _serve(int(sys.argv[1]))
