"""A fork server for the commands that load models: their libraries imported once, each command a fork of it.

A stage that loads a model spends most of its CPU importing (torch, transformers, peft, DeepSpeed, Great
Expectations: about 5 s of a 7 s `llmops evaluate` on a tiny model), and a pipeline runs a dozen such
processes. The first stage command of a run starts a server in the background (`python -m llmops.core.forkserver
serve`) and runs itself as usual; the next ones (and `llmops serve start`, and a single training process) ask the
server, which forks a process that is already past those imports. Python's own forkserver (multiprocessing) serves
the children of one interpreter, and these commands are started by DVC, each a new interpreter: hence ours, after
the same pattern.

The forked process is the command as it would have run: it gets the caller's arguments, working directory,
environment and standard streams (the descriptors themselves, passed over the socket), a process group of its
own that the caller's signals are forwarded to, the caller's command line as its title (`ps`), and the caller
exits as it does (its status, or the signal that ended it). If the caller dies (SIGKILL), its forked process is
killed with it. To the world, the command's pid is the caller's (`own_pid`).

What is imported at start is read from the environment, so a server only serves callers whose environment is the
one it started with, but for variables nothing it imports reads (`_keyless`): a server is found by a hash of the
rest, of the interpreter, of the package's code, and of what the kernel holds a process to (its control group,
limits, CPUs and niceness: a forked process keeps the server's). What its commands imported (each leaves the list in the
server's folder), a fork of the server imports while the server goes on serving, then takes its place; the list is
kept for the next server. It forks only while it has one Python thread, and stops after IDLE_S idle seconds, at
SIGTERM, or when its socket is taken over.

LLMOPS_FORKSERVER=0 turns it off (every command then starts as a plain interpreter), as does a GPU driver;
LLMOPS_FORKSERVER_DIR moves its sockets (default: a folder of this user's in the temporary directory).
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import selectors
import signal
import socket
import struct
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

from llmops.core import fs

IDLE_S = 300.0
# Variables read when a command runs, never when a library the server holds is imported: they may differ between a
# server and its callers. (DVC names the stage; torch.distributed reads its rendezvous at init; our own settings,
# Prefect's, AWS's and git's are read by our code and by subprocesses, and the server never imports prefect; pytest's
# name the test and the worker; torch reads TORCH_EXTENSIONS_DIR when it builds an op (the trainer sets it); DeepSpeed's
# import sets the last two, read when CUDA is first asked for and by torch.compile: a command that imported it passes
# them on, one that did not does not.)
_KEYLESS = {"PWD", "OLDPWD", "SHLVL", "_", "DVC_ROOT", "DVC_STAGE", "RANK", "LOCAL_RANK", "WORLD_SIZE",
            "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "PYTHONUNBUFFERED", "TORCH_EXTENSIONS_DIR",
            "PYTORCH_NVML_BASED_CUDA_CHECK", "TORCHINDUCTOR_CACHE_DIR"}
_KEYLESS_PREFIXES = ("LLMOPS_", "PREFECT_", "AWS_", "GIT_", "PYTEST_")
_NEVER_IMPORTED = ("prefect", "__main__", "__mp_main__", "llmops.core.forkserver")
_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)
_HEADER = struct.Struct("!I")


def _keyless(name: str) -> bool:
    return name in _KEYLESS or name.startswith(_KEYLESS_PREFIXES)


def _folder(env: dict[str, str] | os._Environ) -> Path:
    return Path(env.get("LLMOPS_FORKSERVER_DIR") or Path(tempfile.gettempdir(), f"llmops-forkserver-{os.getuid()}"))


def _key(env: dict[str, str] | os._Environ) -> str:
    """What a server's imports depend on: the interpreter, the installed packages, this package's code, the
    environment but for `_keyless` variables."""
    package = Path(__file__).resolve().parents[1]
    stamp = max(p.stat().st_mtime_ns for p in package.rglob("*.py"))
    digest = hashlib.sha256(f"{sys.executable}\0{package}\0{stamp}\0".encode())
    for path in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}:
        digest.update(f"{path}\0{os.stat(path).st_mtime_ns}\0".encode())
    for name, value in sorted(env.items()):
        if not _keyless(name):
            digest.update(f"{name}={value}\0".encode())
    digest.update(_placement().encode())
    return digest.hexdigest()[:20]


def _placement() -> str:
    """What the kernel holds a forked process to, which it gets from the server, not from its caller: the control
    group (a service manager stops a service by its group: a command forked for one service must not belong to
    another's), the resource limits, the CPUs and the niceness."""
    import resource

    try:
        group = Path("/proc/self/cgroup").read_text()
    except OSError:
        group = ""
    limits = [resource.getrlimit(getattr(resource, name)) for name in dir(resource) if name.startswith("RLIMIT_")]
    return f"{group}\0{limits}\0{sorted(os.sched_getaffinity(0))}\0{os.nice(0)}"


def _private(folder: Path) -> Path:
    """The folder, made if missing; refused unless it is ours and no one else's (whoever can reach the socket can
    run commands as us)."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = folder.stat()
    if st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise PermissionError(f"{folder} must belong to this user alone (mode 700)")
    return folder


# A GPU driver's: a process forked from one that touched it (DeepSpeed asks torch for devices when imported) cannot use
# the GPU (CUDA and ROCm alike). There, where a run's time is the GPU's, every command starts as a plain interpreter.
GPU_DRIVERS = ("/proc/driver/nvidia", "/dev/kfd")


def enabled() -> bool:
    """On Linux, without a GPU driver, unless LLMOPS_FORKSERVER=0."""
    return (os.environ.get("LLMOPS_FORKSERVER", "1") != "0" and hasattr(os, "pidfd_open")
            and not any(os.path.exists(path) for path in GPU_DRIVERS))


# -- the caller ----------------------------------------------------------------------------------------------------


def forward(argv: list[str], entry: str | None = None, module: str | None = None) -> int | None:
    """Run this command in a fork of the server for this environment: its exit status (this process takes the
    signal that ended it, if one did). None where no server is ready: the caller runs the command itself, and a
    server is started for the commands after it.

    `argv` is the command's sys.argv. What runs: `entry` ("package.module:function", called with argv[1:] and
    returning the exit status, as a console script's), or `module`, run as `python -P -m` runs it (the server's
    modules are the installed package's, never a working directory's).
    """
    if not enabled():
        return None
    try:
        folder = _private(_folder(os.environ))
        path = folder / f"{_key(os.environ)}.sock"
    except OSError:
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
    except OSError:
        sock.close()
        _start_server(path)
        import atexit

        atexit.register(_leave_imports, set(sys.modules), path)  # what this command imports, the server learns
        return None
    with sock:
        request = json.dumps({"argv": argv, "entry": entry, "module": module, "cwd": os.getcwd(),
                              "env": dict(os.environ), "title": " ".join(_own_cmdline())}).encode()
        replies = sock.makefile("rb")
        # our signals go to the command's process group; one that comes before we know it waits for it
        group: list[int] = []
        early: list[int] = []
        def forward_signal(sig: int, _) -> None:
            _signal_group(group[0], sig) if group else early.append(sig)

        forwarded = {sig: signal.signal(sig, forward_signal) for sig in _SIGNALS}
        try:
            socket.send_fds(sock, [_HEADER.pack(len(request)) + request], [0, 1, 2])
            pid = _read(replies).get("pid")
        except OSError:
            pid = None
        if pid is not None:
            group.append(pid)
            for sig in early:
                _signal_group(pid, sig)
            ended = _read(replies)
        for sig, handler in forwarded.items():
            signal.signal(sig, handler)
    if pid is None:  # the server went away before forking (it was stopping): nothing ran, the caller runs it
        for sig in early:
            signal.raise_signal(sig)
        return None
    if "signal" in ended:  # die as it died, so our parent (DVC, a shell) sees what it would have seen
        sys.stdout.flush()
        signal.signal(ended["signal"], signal.SIG_DFL)
        os.kill(os.getpid(), ended["signal"])
        return 128 + ended["signal"]
    return int(ended.get("exit", 1))


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


def _own_cmdline() -> list[str]:
    try:
        return Path("/proc/self/cmdline").read_bytes().decode(errors="replace").rstrip("\0").split("\0")
    except OSError:
        return [sys.executable, *sys.argv]


def _read(replies) -> dict:
    """The server's next line (JSON); {} at the end of the stream."""
    line = replies.readline()
    return json.loads(line) if line.endswith(b"\n") else {}


def _start_server(path: Path) -> None:
    """A server for this environment, in the background, in a session of its own; it exits at once if another
    is starting for the same key."""
    subprocess.Popen([sys.executable, "-P", "-m", "llmops.core.forkserver", "serve", str(path)], cwd="/",
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                     start_new_session=True, close_fds=True)


def stop_all(folder: Path) -> list[int]:
    """SIGTERM every server whose socket is in `folder` (those holding their lock: a pid alone may be another
    process's by now); their pids."""
    import fcntl

    stopped = []
    for lockfile in folder.glob("*.lock"):
        with open(lockfile) as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
                continue  # no server holds it
            except BlockingIOError:
                pid = int(lock.read() or 0)
        if pid:
            os.kill(pid, signal.SIGTERM)
            stopped.append(pid)
    return stopped


# -- the server ----------------------------------------------------------------------------------------------------


@dataclass
class Request:
    argv: list[str]
    entry: str | None
    module: str | None
    cwd: str
    env: dict[str, str]
    title: str
    fds: list[int] = field(default_factory=list)
    caller: int = 0  # the caller's pid (SO_PEERCRED)


_STARTED_WITH: dict[str, str] = {}  # the server's environment before its imports
_CALLER = 0  # in a forked command: its caller's pid


def own_pid() -> int:
    """This command's pid as the world knows it: where it was forked for a caller, the caller's (the process its
    starter waits for, and whose signals reach this one); else its own."""
    return _CALLER or os.getpid()


class _Stop(Exception):
    pass


class _HandedOver(Exception):
    pass


def _stop(*_) -> None:
    raise _Stop()


def _handed_over(*_) -> None:
    raise _HandedOver()


def serve(path: Path) -> Request | None:
    """Serve until idle; returns only in a forked command, with what it is to run.

    What the commands left to learn is imported by a fork of the server (the next generation), while this one goes
    on serving; once its imports are done, it takes over the socket and this one exits.
    """
    import fcntl

    lock = open(path.with_suffix(".lock"), "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return None  # another server for this key is starting or serving
    _claim(lock)
    global _STARTED_WITH
    _STARTED_WITH = dict(os.environ)
    if not _learn(path):
        return None
    seen = _mtime(path.parent / "modules.json")
    path.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(64)
    inode = path.stat().st_ino
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGUSR1, _handed_over)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    idle_s = float(os.environ.get("LLMOPS_FORKSERVER_IDLE_S", IDLE_S))
    last = time.monotonic()
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    learner = None
    try:
        while time.monotonic() - last < idle_s:
            if learner in _reap():
                learner = None  # it found a module that starts a thread, and left this server serving
            if not path.exists() or path.stat().st_ino != inode:
                break  # removed, or taken over by another server: stop serving
            if not selector.select(timeout=1.0):
                # something to learn: from our commands, or from another server (another environment's)
                news = any(path.parent.glob(f"{path.stem}.learn-*.json"))
                if learner is None and (news or _mtime(path.parent / "modules.json") != seen):
                    seen = _mtime(path.parent / "modules.json")
                    learner = os.fork()
                    if learner == 0:  # the next generation: it takes over once it imported something more
                        parent, imported = os.getppid(), len(sys.modules)
                        if not _learn(path) or len(sys.modules) == imported:
                            os._exit(0)
                        learner, seen = None, _mtime(path.parent / "modules.json")
                        _claim(lock)
                        os.kill(parent, signal.SIGUSR1)
                continue
            conn, _ = listener.accept()
            last = time.monotonic()
            caller, uid = _peer(conn)
            if uid != os.getuid():
                conn.close()
                continue
            if not _one_thread():
                conn.close()  # (the caller runs the command itself)
                break
            sys.stdout.flush()
            sys.stderr.flush()
            gc.freeze()  # what the server holds, the fork's collections leave alone (else they copy its memory)
            if os.fork() == 0:
                selector.close()
                listener.close()
                lock.close()
                return _supervise(conn, caller)
            conn.close()
    except _HandedOver:
        return None  # the next generation serves the socket now
    except _Stop:
        pass
    if path.exists() and path.stat().st_ino == inode:
        path.unlink()
    return None


def _claim(lock) -> None:
    """Write our pid into the lock we hold (stop_all reads it)."""
    lock.seek(0)
    lock.truncate()
    lock.write(str(os.getpid()))
    lock.flush()


def _peer(conn: socket.socket) -> tuple[int, int]:
    """The connecting process's pid and uid (as the kernel saw them at connect)."""
    pid, uid, _ = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    return pid, uid


def _reap() -> list[int]:
    """The children that exited (reaped)."""
    reaped = []
    try:
        while pid := os.waitpid(-1, os.WNOHANG)[0]:
            reaped.append(pid)
    except ChildProcessError:
        pass
    return reaped


def _supervise(conn: socket.socket, caller: int) -> Request | None:
    """In the fork that serves one caller: read its request, fork the command, tell the caller its pid and how it
    ended; kill it if the caller dies first. Returns only in the command's process."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        data, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
        (size,) = _HEADER.unpack_from(data)
        body = data[_HEADER.size:]
        while len(body) < size:
            chunk = conn.recv(size - len(body))
            if not chunk:
                os._exit(0)
            body += chunk
        request = Request(**json.loads(body), fds=fds, caller=caller)
    except (OSError, ValueError, struct.error):
        os._exit(0)
    pid = os.fork()
    if pid == 0:
        conn.close()
        os.setpgid(0, 0)
        return request
    try:
        os.setpgid(pid, pid)
    except OSError:
        pass  # it did so itself already, or has exited
    for fd in fds:
        os.close(fd)
    try:
        conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")
        pidfd = os.pidfd_open(pid)
        selector = selectors.DefaultSelector()
        selector.register(conn, selectors.EVENT_READ)
        selector.register(pidfd, selectors.EVENT_READ)
        while True:
            for key, _ in selector.select():
                if key.fileobj is conn and not conn.recv(1):
                    raise ConnectionResetError  # the caller is gone
                if key.fileobj == pidfd:
                    _, status = os.waitpid(pid, 0)
                    ended = ({"signal": os.WTERMSIG(status)} if os.WIFSIGNALED(status)
                             else {"exit": os.waitstatus_to_exitcode(status)})
                    try:
                        conn.sendall(json.dumps(ended).encode() + b"\n")
                    except OSError:
                        pass
                    os._exit(0)
    except OSError:
        # The caller is gone: it closed, or was killed (before reading our reply, its end resets: ECONNRESET).
        _signal_group(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os._exit(0)


def _become(request: Request) -> None:
    """This forked process takes on the caller's place: streams, directory, environment, arguments, title."""
    import setproctitle

    global _CALLER
    _CALLER = request.caller
    setproctitle.setproctitle(request.title)  # (before the environment changes: it moves it to make room)
    for sig in (*_SIGNALS, signal.SIGCHLD):
        signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL)
    for target, fd in enumerate(request.fds):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request.cwd)
    # the caller's environment, and what the imports set in ours (torch and DeepSpeed set a few variables when
    # imported): the command would have set them too, importing the same
    imported = {name: value for name, value in os.environ.items() if _STARTED_WITH.get(name) != value}
    os.environ.clear()
    os.environ.update(request.env)
    os.environ.update(imported)
    tempfile.tempdir = None  # found again from this environment
    unbuffered = bool(request.env.get("PYTHONUNBUFFERED"))
    for stream in (sys.stdout, sys.stderr):  # as an interpreter started on these descriptors would buffer them
        stream.reconfigure(line_buffering=unbuffered or stream is sys.stderr or os.isatty(stream.fileno()))
    if "numpy" in sys.modules:  # a new process's global numpy generator is seeded afresh; Python's random is, at fork
        sys.modules["numpy"].random.seed()
    if "torch" in sys.modules:  # and torch's starts at its default seed
        torch = sys.modules["torch"]
        torch.default_generator.manual_seed(torch.initial_seed())


def _run(request: Request, path: Path) -> int:
    import atexit
    import importlib

    before = set(sys.modules)
    atexit.register(_leave_imports, before, path)
    _become(request)
    sys.argv = list(request.argv)
    if request.module:
        return _run_module(request.module)
    module, function = (request.entry or "").split(":")
    return getattr(importlib.import_module(module), function)(request.argv[1:])


def _end(command: Callable[[], int | None]) -> NoReturn:
    """Run the forked command and end the process as the interpreter would (an uncaught exception printed, SystemExit's
    code, a Ctrl-C left unhandled ending it by SIGINT, non-daemon threads waited for, atexit run, streams flushed), but
    for its teardown of every module: the server's thousands, whose memory the fork shares with the server until
    touched; tearing them down copied it all (~2 s of CPU a command, more than `llmops gate` itself)."""
    import atexit
    import threading

    interrupted = False
    try:
        code = command()
    except SystemExit as exc:
        code = exc.code
    except KeyboardInterrupt:
        sys.excepthook(*sys.exc_info())
        code, interrupted = 130, True
    except BaseException:  # noqa: BLE001 - printed and exit status 1, as the interpreter does
        sys.excepthook(*sys.exc_info())
        code = 1
    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    threading._shutdown()  # what the interpreter's own exit runs first (private, stable since 3.4)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    if interrupted:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    os._exit((code or 0) & 0xFF)


def _run_module(name: str) -> int:
    """`python -P -m name` (the installed module, not one the working directory holds), sys.argv its arguments."""
    import runpy

    sys.modules.pop(name, None)  # the server may hold it imported: run as __main__ afresh, as a new interpreter would
    runpy.run_module(name, run_name="__main__", alter_sys=True)
    return 0


def _leave_imports(before: set[str], path: Path) -> None:
    """At the command's exit: what it imported that the server at `path` lacks, for that server to import."""
    new = [name for name in sys.modules if name not in before and not name.startswith(_NEVER_IMPORTED)]
    if new:
        try:
            fs.write_text(path.with_name(f"{path.stem}.learn-{os.getpid()}.json"), json.dumps(new))
        except OSError:
            pass


def _mtime(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return 0


def _load(path: Path, part: str = "") -> list[str]:
    """A list of module names: a command's (a list), or one part of what servers learned ({"import", "skip"})."""
    try:
        names = json.loads(path.read_text())
        names = names.get(part, []) if part else names
        return [name for name in names if isinstance(name, str)]
    except (OSError, ValueError, AttributeError):
        return []


def _one_thread() -> bool:
    """A fork copies only the thread that forks: beside another Python thread, it could copy a lock that one held
    (the import lock, a logging handler's), forever. (Native pools started by imports are made for fork: OpenBLAS's
    and jemalloc's, under numpy and pyarrow, stop or restart theirs through pthread_atfork handlers.)"""
    import threading

    return threading.active_count() == 1


def _import(names: list[str]) -> str | None:
    """Import `names`, in order, those that import here; the first that started a thread (stop there), if one did."""
    import importlib

    for name in names:
        if name in sys.modules or name.startswith(_NEVER_IMPORTED):
            continue
        try:
            importlib.import_module(name)
        except BaseException:  # noqa: BLE001 - a module importable only in its own context (or not at all here)
            continue
        if not _one_thread():
            return name
    return None


def _learn(path: Path) -> bool:
    """Import what servers learned (the folder's modules.json), and what the commands of the server at `path` left to
    learn, and remember it for every server; a module that starts a thread is remembered apart, never to be imported
    again. Whether this process has one Python thread still (and can serve)."""
    learned = path.parent / "modules.json"
    known, skip = _load(learned, "import"), _load(learned, "skip")
    new: list[str] = []
    for note in path.parent.glob(f"{path.stem}.learn-*.json"):
        new += [name for name in _load(note) if name not in known and name not in skip and name not in new]
        note.unlink(missing_ok=True)
    threaded = _import([name for name in known if name not in skip]) or _import(new)
    if threaded:
        skip.append(threaded)
    if new or threaded:
        known += [name for name in new if name in sys.modules and name not in known]
        fs.write_text(learned, json.dumps({"import": [name for name in known if name not in skip], "skip": skip}))
    return threaded is None


def _main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "serve":
        request = serve(Path(sys.argv[2]))
        if request is not None:
            _end(lambda: _run(request, Path(sys.argv[2])))
        return 0
    if len(sys.argv) >= 3 and sys.argv[1] == "-m":  # `-m MODULE ARGS`: run MODULE as `python -P -m` would, forked
        sys.argv = sys.argv[2:]
        status = forward(sys.argv, module=sys.argv[0])
        return _run_module(sys.argv[0]) if status is None else status
    print("usage: python -m llmops.core.forkserver (serve SOCKET | -m MODULE [ARGS])", file=sys.stderr)
    return 2


if __name__ == "__main__":  # run as the package's module, not as __main__: own_pid() reads what the server set there
    from llmops.core import forkserver

    sys.exit(forkserver._main())
