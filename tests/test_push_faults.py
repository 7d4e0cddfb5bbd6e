"""A push that fails mid-write (a full disk) leaves nothing partial on the local remote."""

from __future__ import annotations

import hashlib
import os
import re
import resource
import signal
import subprocess
import sys
from pathlib import Path

from conftest import REPO, base_env, run

LIMIT = 256 * 1024  # bytes any one file may grow to in the failing push; each object below is bigger
DVC_TMP = re.compile(r"\.[A-Za-z0-9_-]{22}\.tmp")  # dvc-objects' partial-upload naming

PUSH = """
import sys
from llmops.core.config import StorageParams
from llmops.pipeline.remote import push
from llmops.pipeline.repro import StageError
try:
    push(".", StorageParams(remote="local", local_dir=sys.argv[1]))
except StageError as exc:
    print(exc)
    sys.exit(3)
"""


def _small_disk() -> None:
    """In the child only: writes past LIMIT bytes fail with EFBIG, as a full disk fails them with ENOSPC."""
    resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, LIMIT))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def _push(project: Path, remote: Path, full_disk: bool) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", PUSH, str(remote)], cwd=project, env=base_env(PYTHONPATH=str(REPO)),
        capture_output=True, text=True, timeout=300, preexec_fn=_small_disk if full_disk else None,
    )


def _files(remote: Path) -> set[Path]:
    return {p for p in remote.rglob("*") if p.is_file()}


def test_failed_push_to_local_remote_leaves_no_temp_files(tmp_path):
    project, remote = tmp_path / "project", tmp_path / "remote"
    project.mkdir()
    run(["git", "init", "-q", "-b", "main"], project)
    run(["dvc", "init", "-q"], project)

    # already on the remote before the failing push: a complete object, and someone else's partial upload
    (project / "small.txt").write_text("already pushed\n")
    run(["dvc", "add", "-q", "small.txt"], project)
    assert _push(project, remote, full_disk=False).returncode == 0
    others = remote / "files" / "md5" / "00" / ".AAAAAAAAAAAAAAAAAAAAAA.tmp"
    others.parent.mkdir(parents=True, exist_ok=True)
    others.write_bytes(b"not ours")
    before = {p: p.read_bytes() for p in _files(remote)}

    data = project / "data"
    data.mkdir()
    for i in range(4):
        (data / f"part{i}.bin").write_bytes(os.urandom(1024 * 1024))
    run(["dvc", "add", "-q", "data"], project)

    failed = _push(project, remote, full_disk=True)
    assert failed.returncode == 3, failed.stdout + failed.stderr
    message = failed.stdout.strip()
    assert "\n" not in message, message
    assert message.startswith(f"push to {remote} failed: "), message
    assert "File too large" in message, message
    assert message.endswith("; nothing partial was left on the remote"), message

    after = _files(remote)
    assert {p for p in after if DVC_TMP.fullmatch(p.name)} == {others}  # ours gone, theirs kept
    assert {p: p.read_bytes() for p in before} == before  # nothing that was there was touched
    for obj in after - set(before):  # what the failed push did add is whole objects, named by their md5
        assert hashlib.md5(obj.read_bytes()).hexdigest() == obj.parent.name + obj.name.removesuffix(".dir"), obj

    assert _push(project, remote, full_disk=False).returncode == 0
    status = run(["dvc", "status", "-c", "--json"], project).stdout.strip()
    assert status in ("{}", ""), status
