"""The one writer of files and directories (llmops/core/fs.py): whole or not at all, private where asked, fetched once;
and the one polling loop (llmops/core/procs.py)."""

from __future__ import annotations

import stat

import pytest

from llmops.core.fs import fetch_into, write_text, writing


def _left(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_a_write_that_fails_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "report.json"
    write_text(path, "old\n")
    with pytest.raises(RuntimeError), writing(path) as tmp:
        tmp.write_text("half of a new one")
        raise RuntimeError("disk full")
    assert path.read_text() == "old\n" and _left(tmp_path) == ["report.json"]

    with writing(path) as tmp:  # a writer that wants a name; the suffix says its format
        assert tmp.suffix == ".json" and tmp.parent == tmp_path
        tmp.write_text("new\n")
    assert path.read_text() == "new\n" and _left(tmp_path) == ["report.json"]


def test_a_directory_is_swapped_in_whole(tmp_path):
    out = tmp_path / "reports"
    with writing(out) as tmp:
        tmp.mkdir()
        (tmp / "a.txt").write_text("1")
    with pytest.raises(KeyboardInterrupt), writing(out) as tmp:
        tmp.mkdir()
        (tmp / "a.txt").write_text("2")
        raise KeyboardInterrupt
    assert (out / "a.txt").read_text() == "1" and _left(tmp_path) == ["reports"]


def test_a_private_file_is_never_readable_by_others(tmp_path):
    path = tmp_path / "api_keys"
    write_text(path, "secret\n", private=True)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    write_text(tmp_path / "plain", "x")
    assert stat.S_IMODE((tmp_path / "plain").stat().st_mode) & 0o044  # the umask's default: readable


def test_a_fetch_is_complete_or_absent_and_the_first_one_wins(tmp_path):
    target = tmp_path / "models" / "v1"

    def broken(tmp):
        tmp.mkdir()
        (tmp / "weights").write_text("half")
        raise OSError("connection reset")

    with pytest.raises(OSError):
        fetch_into(target, broken)
    assert not target.exists() and _left(target.parent) == []

    def racing(tmp):  # another process completes the same fetch meanwhile
        tmp.mkdir()
        (tmp / "weights").write_text("mine")
        target.mkdir()
        (target / "weights").write_text("theirs")

    assert fetch_into(target, racing) == target
    assert (target / "weights").read_text() == "theirs" and _left(target.parent) == ["v1"]
    assert fetch_into(target, broken) == target  # there already: not fetched again


def test_one_polling_loop_stops_on_the_first_answer_a_dead_process_or_the_clock():
    import subprocess
    import time

    from llmops.core.procs import Exited, wait_until

    answers = iter([None, 0, "ready"])
    assert wait_until(lambda: next(answers), 5, interval_s=0.01) == "ready"
    started = time.monotonic()
    assert wait_until(lambda: None, 0.3, interval_s=0.05) is None and time.monotonic() - started < 2
    proc = subprocess.Popen(["sleep", "0.2"])
    with pytest.raises(Exited):  # at once, not after the 60 s
        wait_until(lambda: False, 60, interval_s=0.05, proc=proc)
