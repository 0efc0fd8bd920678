"""Checks of the folders a user names for a command's output, before any work starts."""

from __future__ import annotations

import os
from pathlib import Path

from ilm_dist.errors import InputError


def check_output_dir(path: str | Path, key: str) -> None:
    """Raise :class:`InputError` unless ``path`` is a folder this process can write, or one it can create.

    Creates nothing, so a dry run or a refused command leaves no folder behind. ``key`` names the setting in
    the message, e.g. ``output_dir`` or ``--out``.
    """
    target = Path(os.path.abspath(path))
    existing = next(p for p in (target, *target.parents) if os.path.lexists(p))
    if existing == target and not target.is_dir():
        raise InputError(f"{key} {path}: exists and is not a directory")
    if not existing.is_dir():
        raise InputError(f"{key} {path}: cannot be created, {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "is not writable" if existing == target else f"cannot be created, {existing} is not writable"
        raise InputError(f"{key} {path}: {where}")
