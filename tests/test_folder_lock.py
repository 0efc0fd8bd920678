"""One process owns a folder (ilm_dist.folder_lock): a second holder is refused naming the first, a killed
holder's lock is taken over and reported, and a lock that wrote nothing else leaves nothing behind."""

import logging
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from ilm_dist.folder_lock import LOCK_FILE, FolderBusy, FolderLock

HOLD = "import sys; from ilm_dist.folder_lock import FolderLock; FolderLock(sys.argv[1], 'test holder'); print('held', flush=True); sys.stdin.read()"


def holder(folder: Path) -> subprocess.Popen:
    """Another process holding ``folder``'s lock until its stdin closes."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(folder)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline() == "held\n"
    return proc


def test_a_second_holder_is_refused_naming_the_first(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    proc = holder(tmp_path)
    try:
        with pytest.raises(FolderBusy) as caught:
            FolderLock(tmp_path, "second")
        assert str(caught.value).startswith(
            f"{tmp_path} is in use by test holder pid {proc.pid} on {socket.gethostname()} since "
        )
        assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_FILE, "notes.txt"]
    finally:
        proc.communicate("")
    lock = FolderLock(tmp_path, "second")  # free once the holder ended
    lock.release()
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"] and (
        tmp_path / "notes.txt"
    ).read_text() == "mine"


def test_a_killed_holders_lock_is_taken_over_and_reported(tmp_path, caplog):
    (tmp_path / "run.txt").write_text("x")
    proc = holder(tmp_path)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with caplog.at_level(logging.WARNING, logger="ilm_dist"):
        lock = FolderLock(tmp_path, "next")
    assert f"taking over a stale lock: test holder pid {proc.pid} on " in caplog.text
    assert (tmp_path / LOCK_FILE).read_text().startswith(f"next pid {os.getpid()} on ")
    lock.release()


def test_a_released_lock_leaves_nothing(tmp_path):
    FolderLock(tmp_path / "new" / "run", "x").release()
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == ["new"]
    lock = FolderLock(tmp_path / "new", "x", name=".run.lock")
    assert (tmp_path / "new" / ".run.lock").read_text().startswith(f"x pid {os.getpid()} on ")
    lock.release()
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == ["new"]


def test_a_lock_file_removed_by_a_releasing_holder_is_not_held_twice(tmp_path):
    """The holder that created the file removes it on release; a process that opened the old file meanwhile
    must lock the new one (inode check), not hold a lock on a removed file beside a second holder."""
    first = FolderLock(tmp_path / "run", "first")
    stale_fd = os.open(first.path, os.O_RDWR)  # a second process opened the file before the release
    first.release()
    second = FolderLock(tmp_path / "run", "second")
    with pytest.raises(FolderBusy, match="in use by second pid"):
        FolderLock(tmp_path / "run", "third")
    second.release()
    os.close(stale_fd)
