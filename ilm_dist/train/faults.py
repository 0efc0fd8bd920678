"""Fault injection for the crash tests: ``ILM_DIST_FAULT=<where>@<step>[:<rank>]``.

``where`` is ``step`` (after the optimizer step) or ``save`` (inside a checkpoint save, after the
files are written and before ``latest`` moves), where the process SIGKILLs itself like a pre-empted
node, or ``nan`` (that step's loss terms become NaN on that rank, like a bad batch on one rank).
Unset in normal runs; reading it costs one dict lookup per call. A malformed value is an
:class:`~ilm_dist.errors.InputError`, not a fault that silently never fires.
"""

from __future__ import annotations

import os
import signal

from ilm_dist import distributed as D
from ilm_dist.errors import InputError

ENV = "ILM_DIST_FAULT"
PLACES = ("step", "save", "nan")


def fault_spec() -> tuple[str, int, int | None] | None:
    """``ILM_DIST_FAULT`` as ``(where, step, rank)`` (rank None: every rank); None when unset."""
    spec = os.environ.get(ENV)
    if not spec:
        return None
    place, _, rest = spec.partition("@")
    at, colon, rank = rest.partition(":")
    if place not in PLACES or not at.isdigit() or (colon and not rank.isdigit()):
        raise InputError(
            f"{ENV}={spec!r}: expected <where>@<step>[:<rank>] with <where> one of {', '.join(PLACES)} "
            "and whole-number <step> and <rank>"
        )
    return place, int(at), int(rank) if colon else None


def injected(where: str, step: int) -> bool:
    """Whether ``ILM_DIST_FAULT`` names ``where`` at ``step`` on this rank (or on every rank)."""
    spec = fault_spec()
    if spec is None:
        return False
    place, at, rank = spec
    return place == where and at == step and (rank is None or rank == D.rank())


def maybe_kill(where: str, step: int) -> None:
    if injected(where, step):
        os.kill(os.getpid(), signal.SIGKILL)
