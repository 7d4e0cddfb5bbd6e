"""The fork server: a command it forks runs as it would have alone (streams, directory, environment, arguments,
exit status, signals), dies with its caller, and a server never forks beside a thread."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import _exited, base_env
from llmops.core import forkserver
from llmops.core.procs import wait_until

pytestmark = pytest.mark.services

# A command of our own, importable by the server through PYTHONPATH (a variable its key includes).
COMMAND = '''
import json, os, sys, time
import setproctitle  # something to import that the server then learns
if sys.argv[1:2] == ["sleep"]:
    try:
        print(json.dumps({"pid": os.getpid()}), flush=True)
        time.sleep(120)
    except KeyboardInterrupt:
        print("interrupted", flush=True)
        sys.exit(130)
if sys.argv[1:2] == ["die"]:
    os.kill(os.getpid(), 15)
from llmops.core.forkserver import own_pid
print(json.dumps({"pid": os.getpid(), "own": own_pid(), "argv": sys.argv[1:], "cwd": os.getcwd(),
                  "var": os.environ.get("LLMOPS_X"), "stdin": sys.stdin.read(),
                  "title": open("/proc/self/cmdline").read()}))
sys.exit(int(os.environ.get("LLMOPS_EXIT", "0")))
'''


@pytest.fixture
def env(tmp_path):
    (tmp_path / "mods").mkdir()
    (tmp_path / "mods/fs_command.py").write_text(COMMAND)
    (tmp_path / "mods/fs_thread.py").write_text(
        "import threading, time\nthreading.Thread(target=time.sleep, args=(60,), daemon=True).start()\n")
    folder = tmp_path / "fs"
    env = base_env(PYTHONPATH=str(tmp_path / "mods"), LLMOPS_FORKSERVER="1", LLMOPS_FORKSERVER_DIR=str(folder))
    yield env
    if folder.is_dir():
        forkserver.stop_all(folder)


def _call(env: dict, *args: str, cwd: Path | None = None, stdin: str = "", nice: int = 0,
          **extra: str) -> tuple[int, dict, int]:
    """`python -m llmops.core.forkserver -m fs_command ARGS`: (exit status, what the command saw, the caller's pid)."""
    proc = subprocess.Popen([sys.executable, "-P", "-m", "llmops.core.forkserver", "-m", "fs_command", *args],
                            cwd=cwd or Path.home(), env={**env, **extra}, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, preexec_fn=(lambda: os.nice(nice)) if nice else None)
    out, _ = proc.communicate(stdin, timeout=60)
    return proc.returncode, (json.loads(out) if out.strip() else {}), proc.pid


def _serving(env: dict) -> Path:
    """Wait for the server of this environment to listen, and to have learned what its first command imported."""
    folder = Path(env["LLMOPS_FORKSERVER_DIR"])
    assert wait_until(lambda: list(folder.glob("*.sock")) and (folder / "modules.json").is_file() and "setproctitle" in
                      json.loads((folder / "modules.json").read_text())["import"], 60)
    return folder


def test_a_forked_command_sees_what_it_would_see_alone_and_exits_as_it_exits(env, tmp_path):
    status, alone, caller = _call(env, "a", cwd=tmp_path, stdin="in", LLMOPS_X="1")
    assert status == 0 and alone["pid"] == caller  # no server yet: it ran in the caller, and started one
    _serving(env)
    status, forked, caller = _call(env, "b", "c d", cwd=tmp_path, stdin="piped", LLMOPS_X="2", LLMOPS_EXIT="3")
    assert status == 3 and forked["pid"] != caller  # forked by the server, its exit status the caller's
    assert forked["argv"] == ["b", "c d"] and forked["cwd"] == str(tmp_path) and forked["stdin"] == "piped"
    assert forked["own"] == caller  # the pid it gives as its own: the one its starter knows, and signals
    assert forked["var"] == "2"  # the caller's environment, not the server's
    assert "-m fs_command b c d" in forked["title"]  # ps shows the command, not the server
    assert _call(env, "e", MY_OTHER_SETTING="1")[1]["pid"] != _call(env, "e")[1]["pid"]
    assert len(list(Path(env["LLMOPS_FORKSERVER_DIR"]).glob("*.sock"))) == 2  # another environment, another server
    # a caller the kernel holds to other limits, CPUs, niceness or control group: not forked by a server that has others
    assert _call(env, "e", nice=5)[1]["pid"] != _call(env, "e")[1]["pid"]


def test_signals_reach_the_forked_command_and_it_dies_with_its_caller(env):
    _call(env, "start")
    _serving(env)
    for sig, expect in ((signal.SIGINT, 130), (signal.SIGKILL, -signal.SIGKILL)):
        proc = subprocess.Popen([sys.executable, "-P", "-m", "llmops.core.forkserver", "-m", "fs_command", "sleep"],
                                env=env, stdout=subprocess.PIPE, text=True)
        pid = json.loads(proc.stdout.readline())["pid"]
        assert pid != proc.pid
        proc.send_signal(sig)
        assert proc.wait(30) == expect
        if sig == signal.SIGINT:
            assert proc.stdout.read() == "interrupted\n"  # Ctrl-C went through its own handler
        assert wait_until(lambda: _exited(pid), 10)
    assert _call(env, "die")[0] == -signal.SIGTERM  # killed by a signal: so is the caller


def test_a_caller_killed_before_it_read_the_reply_takes_its_command_with_it(env):
    """Its end of the socket then resets (ECONNRESET) rather than closes: the command is killed all the same."""
    _call(env, "start")
    (path,) = _serving(env).glob("*.sock")
    request = json.dumps({"argv": ["fs_command", "sleep"], "entry": None, "module": "fs_command", "cwd": "/",
                          "env": env, "title": "t"}).encode()
    read, write = os.pipe()
    with socket.socket(socket.AF_UNIX) as caller, os.fdopen(read) as out:
        caller.connect(str(path))
        socket.send_fds(caller, [forkserver._HEADER.pack(len(request)) + request], [0, write, 2])
        os.close(write)
        pid = json.loads(out.readline())["pid"]  # the command runs; the server's reply (its pid) is left unread
    assert wait_until(lambda: _exited(pid), 10)


def test_a_server_never_forks_beside_a_thread_and_the_next_one_skips_what_started_it(env, tmp_path):
    (tmp_path / "mods/fs_command.py").write_text("import fs_thread\n" + COMMAND)
    folder = Path(env["LLMOPS_FORKSERVER_DIR"])
    _call(env)
    # the server (or the fork of it that imports what it learns) imported fs_thread, found a thread of its own, and
    # left it out: remembered, never imported again
    assert wait_until(lambda: (folder / "modules.json").is_file() and
                      json.loads((folder / "modules.json").read_text())["skip"] == ["fs_thread"], 60)
    _call(env)
    _serving(env)
    _, forked, caller = _call(env)
    assert forked["pid"] != caller
    time.sleep(2)  # (what it would learn from that command, it skips)
    _, forked, caller = _call(env)
    server = int(next(folder.glob("*.lock")).read_text())
    assert forked["pid"] != caller and len(list(Path(f"/proc/{server}/task").iterdir())) == 1


def test_off_when_asked_or_where_a_gpu_driver_is(env, monkeypatch):
    status, ran, caller = _call({**env, "LLMOPS_FORKSERVER": "0"}, "a")
    assert status == 0 and ran["pid"] == caller  # the caller ran it, and started no server
    assert not Path(env["LLMOPS_FORKSERVER_DIR"]).exists()
    monkeypatch.delenv("LLMOPS_FORKSERVER", raising=False)
    assert forkserver.enabled()  # on by default
    monkeypatch.setattr(forkserver, "GPU_DRIVERS", (str(Path(env["PYTHONPATH"]) / "fs_command.py"),))
    assert not forkserver.enabled()
