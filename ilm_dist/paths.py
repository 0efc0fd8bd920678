"""Checks of the folders a user names for a command's output, and of the names that become folder names
(methods, runs, sweeps, evaluations), before any work starts."""

from __future__ import annotations

import os
import re
from pathlib import Path

from ilm_dist.errors import ConfigError, InputError

# one plain path component (letters and digits of any script); a leading '-' would read as an option on the
# command lines a name is passed on (an experiment's evaluation --name)
NAME = re.compile(r"[\w.][\w.-]*")
NAME_RULE = "letters, digits, '_', '.', '-' only, not '.' or '..', not starting with '-' (it names a folder)"


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


def check_name(name: object, key: str) -> None:
    """Raise :class:`ConfigError` naming ``key`` and ``name`` unless ``name`` is a name by :data:`NAME_RULE`:
    one folder name, so that it can neither climb out of the folder it is made in (``..``), name that folder
    itself (``.``) nor read as an option (``-x``)."""
    if not (isinstance(name, str) and NAME.fullmatch(name) and name not in (".", "..")):
        raise ConfigError(f"{key}: {name!r}: {NAME_RULE}")
