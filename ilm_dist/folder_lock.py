"""One process owns a folder: an exclusive lock on ``<folder>/.lock`` for the life of a run.

Pretraining runs, evaluation commands and experiments each hold the lock of the folder they write, so a second
process started on the same folder stops at once with one line naming the holder (pid, host, since when) instead
of interleaving its files with the first one's. The lock is ``fcntl.flock`` on the file (kept by the kernel, so
it goes away with the process however it ends, and is honoured across NFS clients, where Linux maps it to a POSIX
lock); the file holds a line naming the holder while it is held and is emptied on release, so a non-empty file
found free is a stale lock: its holder was killed, which is reported. Children a holder passes the descriptor to
keep the lock after the holder dies (an experiment's cells).
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import time
from pathlib import Path

from ilm_dist.errors import InputError

log = logging.getLogger("ilm_dist")

LOCK_FILE = ".lock"


class FolderBusy(InputError):
    """Another process holds the folder's lock."""


class FolderLock:
    """The lock of ``folder`` (created if missing), held until :meth:`release` or the process ends.

    ``what`` says who holds it, in the holder line another process would report (e.g. ``pretraining run``).
    A lock that created its file in a folder holding nothing else removes the file (and the folder, if it
    created that too) on release, so a command that stops before writing anything leaves nothing behind.
    """

    def __init__(self, folder: str | Path, what: str):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self.made_folder = not self.folder.exists()
        self.folder.mkdir(parents=True, exist_ok=True)
        self.made_file = not self.path.exists()
        self.fd = self._lock()
        stale = self._read()
        if stale:
            log.warning(
                "%s: taking over a stale lock: %s, which ended without releasing it", self.folder, stale
            )
        holder = (
            f"{what} pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}"
        )
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, holder.encode(), 0)

    def _lock(self) -> int:
        """An open descriptor of the lock file, locked; the file checked to be the one at the path."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
                os.close(fd)
                raise FolderBusy(
                    f"{self.folder} is in use by {holder} (lock {self.path}); wait for it to end or choose "
                    "another folder"
                ) from None
            if os.path.exists(self.path) and os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                return fd
            os.close(fd)  # a releasing holder removed the file after we opened it: take the new one

    def _read(self) -> str:
        return os.pread(self.fd, 4096, 0).decode(errors="replace").strip()

    def release(self) -> None:
        """Empty the holder line and unlock (idempotent)."""
        if self.fd < 0:
            return
        if self.made_file and [p.name for p in self.folder.iterdir()] == [LOCK_FILE]:
            self.path.unlink()  # still locked: a process that opened it re-opens the path (_lock)
            if self.made_folder:
                self.folder.rmdir()
        else:
            os.ftruncate(self.fd, 0)
        os.close(self.fd)
        self.fd = -1

    def __enter__(self) -> FolderLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()
