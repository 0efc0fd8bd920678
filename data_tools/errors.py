"""Errors the CLIs report as ``error: ...`` (exit 2) instead of a stack trace."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ilm_dist.errors import InputError


class PackError(InputError):
    """Bad input or arguments; the message names the offending file (and line/column) and what was expected."""


class BadImage(Exception):
    """One image cannot be used (unreadable, truncated, too small); ``--skip-bad`` skips and records it."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@contextmanager
def writing(path: Path) -> Iterator[None]:
    """Turn an OSError while writing ``path`` (a full disk, a lost mount, no permission) into a PackError
    naming ``path`` and the system's reason, e.g. ``No space left on device``."""
    try:
        yield
    except OSError as err:
        raise PackError(f"{path}: {err.strerror or err}") from None
