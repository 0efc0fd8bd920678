"""Fault injection for the crash tests: ``ILM_DIST_FAULT=<where>@<step>[:<rank>]``.

``where`` is ``step`` (after the optimizer step) or ``save`` (inside a checkpoint save, after the
files are written and before ``latest`` moves), where the process SIGKILLs itself like a pre-empted
node, or ``nan`` (that step's loss terms become NaN on that rank, like a bad batch on one rank).
Unset in normal runs; reading it costs one dict lookup per call.
"""

from __future__ import annotations

import os
import signal

from ilm_dist import distributed as D

ENV = "ILM_DIST_FAULT"


def injected(where: str, step: int) -> bool:
    """Whether ``ILM_DIST_FAULT`` names ``where`` at ``step`` on this rank (or on every rank)."""
    spec = os.environ.get(ENV)
    if not spec:
        return False
    place, _, rest = spec.partition("@")
    at, _, rank = rest.partition(":")
    return place == where and int(at) == step and (rank == "" or int(rank) == D.rank())


def maybe_kill(where: str, step: int) -> None:
    if injected(where, step):
        os.kill(os.getpid(), signal.SIGKILL)
