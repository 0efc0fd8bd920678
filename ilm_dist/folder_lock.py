"""One process owns a folder: an exclusive lock on ``<folder>/.lock`` for the life of a run.

Pretraining runs, evaluation commands, experiments and the packer each hold the lock of the folder they write
(the packer, which swaps its output folder into place, a ``.<name>.lock`` beside it), so a second process started
on the same folder stops at once with one line naming the holder (pid, host, since when) instead of
interleaving its files with the first one's. The lock is ``fcntl.flock`` on the file (kept by the kernel, so it
goes away with the process however it ends, and honoured across NFS clients, where Linux maps it to a POSIX
lock). The file names its holder and exists only while held: a holder removes it on release (still holding
it; an opener that raced with the removal notices that the path no longer leads to its file and opens again),
so a lock file found free was left by a killed holder, which is reported. Children a holder passes the
descriptor to keep the lock after the holder dies (an experiment's cells).
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

    ``what`` says who holds it, in the holder line another process would report (e.g. ``pretraining run``);
    ``name``: the lock file's name in ``folder``; ``subject``: what the refusal says is in use (default
    ``folder``; the packer's lock beside its output names the output). A folder the lock created is removed again on release if it is
    empty then, so a command that stops before writing anything leaves nothing behind.
    """

    def __init__(self, folder: str | Path, what: str, name: str = LOCK_FILE, subject: Path | None = None):
        self.folder = Path(folder)
        self.subject = subject or self.folder
        self.path = self.folder / name
        self.made_folder = not self.folder.exists()
        self.folder.mkdir(parents=True, exist_ok=True)
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
                    f"{self.subject} is in use by {holder} (lock {self.path}); wait for it to end or choose "
                    "another folder"
                ) from None
            if os.path.exists(self.path) and os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                return fd
            os.close(fd)  # a releasing holder removed the file after we opened it: take the new one

    def _read(self) -> str:
        return os.pread(self.fd, 4096, 0).decode(errors="replace").strip()

    def release(self) -> None:
        """Remove the lock file and unlock (idempotent)."""
        if self.fd < 0:
            return
        self.path.unlink(missing_ok=True)  # still locked: a process that opened it re-opens the path (_lock)
        if self.made_folder and not any(self.folder.iterdir()):
            self.folder.rmdir()
        os.close(self.fd)
        self.fd = -1

    def __enter__(self) -> FolderLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()
