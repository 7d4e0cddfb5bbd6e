"""This project's local `llmops serve` processes: where they keep their state, and how to start, reload and stop them.

Each server writes `.llmops/serve/servers/<port>.json` (pid, URL, what it serves) when it
has loaded its model and again after each reload, and removes it when it exits; a file whose
process is gone is stale and ignored. A server follows a *ref*: a stage (production), a version,
or a directory. SIGHUP makes it resolve its ref again and swap to that model without dropping the
requests in flight (nginx's convention), so `llmops registry rollback` and the deploy step move a
running server with one signal.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.request
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from llmops.core.errors import LlmopsError
from llmops.core.fs import fetch_into, write_text
from llmops.core.layout import SERVE as SERVE_DIR
from llmops.core.procs import Exited, wait_until

STATE_DIR = SERVE_DIR / "servers"
MODELS_DIR = SERVE_DIR / "models"
LOG = SERVE_DIR / "server.log"


class ServerError(LlmopsError):
    """A local server could not be started, reloaded or stopped."""


@dataclass
class Server:
    pid: int
    url: str  # the OpenAI base URL: http://host:port/v1
    port: int
    ref: str  # what it follows: a stage, a version, or a model directory
    model: str  # the name clients ask for
    version: str | None  # the registry version it serves now (None for a directory)
    started: str
    loaded: str  # when the model it serves now was loaded
    reload_error: str | None = None  # why the last reload failed (it kept serving the model before)
    reloads: int = 0  # reloads done or failed since it started
    adapters: list[str] = field(default_factory=list)  # the versions served as adapters on one base (--adapters)
    canary: str | None = None  # the canary and its share of production's requests ("v3.0.0 at 10%")


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _alive(pid: int) -> bool:
    """Whether `pid` is still an `llmops serve` process (a dead server's pid may have been reused: never signal that)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False  # another user's process: not one of ours
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return True  # no /proc (macOS): the pid is all there is to go on
    return b"serve" in cmdline and any(part.endswith(b"llmops") for part in cmdline)


def record(root: Path, server: Server) -> None:
    """Write a server's state file (atomically: a reader never sees half of it)."""
    path = root / STATE_DIR / f"{server.port}.json"
    write_text(path, json.dumps(asdict(server), indent=2))


def forget(root: Path, port: int, pid: int) -> None:
    """Remove a server's state file, if it is still that process's."""
    path = root / STATE_DIR / f"{port}.json"
    try:
        if json.loads(path.read_text())["pid"] == pid:
            path.unlink()
    except (OSError, ValueError, KeyError):
        pass


def running(root: str | os.PathLike) -> list[Server]:
    """The servers of this project whose process is alive, by port."""
    found = []
    for path in sorted((Path(root) / STATE_DIR).glob("*.json")):
        try:
            server = Server(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            continue
        if _alive(server.pid):
            found.append(server)
    return found


def on_port(root: str | os.PathLike, port: int) -> Server | None:
    return next((s for s in running(root) if s.port == port), None)


def port_in_use(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on now (the kernel's pick); the project's one way to find one."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def model_dir(root: str | os.PathLike, version: str) -> Path:
    """A local copy of a registered version's files (pulled once, from the DVC cache or remote; complete or absent)."""
    from llmops.registry import versions as registry

    return fetch_into(Path(root) / MODELS_DIR / version, lambda tmp: registry.pull(root, version, tmp))


def start(root: Path, ref: str, host: str, port: int, max_concurrency: int, timeout_s: float,
          key_hashes: list[str] = (), adapters: bool = False) -> Server:
    """Start `llmops serve` on `ref` as a process of its own session (it outlives the caller and its Ctrl-C); wait
    until it answers. Its output goes to .llmops/serve/server.log.

    Raises:
        ServerError: the port is taken, or the server exited or did not answer in time (the log's tail says why).
    """
    if port_in_use(host, port):
        raise ServerError(f"{host}:{port} is in use by another program")
    env = dict(os.environ)
    env["LLMOPS_API_KEY_HASHES"] = ",".join(filter(None, [env.get("LLMOPS_API_KEY_HASHES", ""), *key_hashes]))
    log_path = root / LOG
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as log:
        log.write(f"--- {now()} llmops serve start --version {ref} --port {port}\n")
        log.flush()
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "llmops"), "serve", "start", "--version", ref, "--host", host, "--port",
             str(port), "--max-concurrency", str(max_concurrency), *(["--adapters"] if adapters else [])],
            cwd=root, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    def answering() -> Server | None:
        server = on_port(root, port)
        return server if server is not None and server.pid == proc.pid and _answers(server) else None

    try:
        server = wait_until(answering, timeout_s, proc=proc)
    except Exited as exc:
        raise ServerError(f"the server on {ref} exited with {exc.returncode}: {_tail(log_path)}") from None
    if server is not None:
        return server
    _stop_pid(proc.pid, 30)
    raise ServerError(f"the server on {ref} did not answer within {timeout_s:.0f}s: {_tail(log_path)}")


def _answers(server: Server) -> bool:
    try:
        with urllib.request.urlopen(server.url.removesuffix("/v1") + "/health", timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


def _tail(path: Path, lines: int = 3) -> str:
    try:
        text = [line for line in path.read_text().splitlines() if line.strip()]
    except OSError:
        return "(no log)"
    return " | ".join(text[-lines:])


def reload(root: Path, server: Server, timeout_s: float) -> Server:
    """Make a running server resolve its ref again and serve that model; returns its new state.

    Raises:
        ServerError: the reload failed (the server still serves what it served before) or timed out.
    """
    os.kill(server.pid, signal.SIGHUP)

    def reloaded() -> Server | None:
        now = on_port(root, server.port)
        if now is None or now.pid != server.pid:
            raise ServerError(f"the server at {server.url} exited while reloading: {_tail(root / LOG)}")
        if now.reloads <= server.reloads:
            return None
        if now.reload_error:
            raise ServerError(f"the server at {server.url} could not reload (it still serves "
                              f"{now.version or now.model}): {now.reload_error}")
        return now

    now = wait_until(reloaded, timeout_s, interval_s=0.2)
    if now is None:
        raise ServerError(f"the server at {server.url} did not reload within {timeout_s:.0f}s")
    return now


def stop(root: Path, server: Server, timeout_s: float = 60) -> None:
    """SIGTERM: the server finishes the requests in flight, then exits."""
    _stop_pid(server.pid, timeout_s)
    forget(root, server.port, server.pid)


def _stop_pid(pid: int, timeout_s: float) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    if _gone(pid, timeout_s):
        return
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    if not _gone(pid, 10):  # "stopped" means stopped: a killed process is not gone until the kernel has ended it
        raise ServerError(f"the server process {pid} did not end, even after SIGKILL")


def _gone(pid: int, timeout_s: float) -> bool:
    """Whether `pid` ended within `timeout_s`: reaped if it is our child, else gone or a zombie.

    Judged by the process state, not by `_alive`'s command line: an exiting process loses its command
    line before it has finished exiting (the kernel drops its memory first), and a server whose parent
    run has ended stays a zombie until init reaps it.
    """
    import psutil

    def ended() -> bool:
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return True
        except ChildProcessError:  # not our child: only its state tells
            pass
        try:
            return psutil.Process(pid).status() in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
        except psutil.NoSuchProcess:
            return True

    return bool(wait_until(ended, timeout_s, interval_s=0.1))
