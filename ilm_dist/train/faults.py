"""Fault injection for the crash tests: ``ILM_DIST_FAULT=<where>@<step>[:<rank>]``.

``where`` is ``step`` (after the optimizer step) or ``save`` (inside a checkpoint save, after the
files are written and before ``latest`` moves). The process SIGKILLs itself, like a pre-empted
node. Unset in normal runs; reading it costs one dict lookup per call.
"""

from __future__ import annotations

import os
import signal

from ilm_dist import distributed as D

ENV = "ILM_DIST_FAULT"


def maybe_kill(where: str, step: int) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    place, _, rest = spec.partition("@")
    at, _, rank = rest.partition(":")
    if place == where and int(at) == step and (rank == "" or int(rank) == D.rank()):
        os.kill(os.getpid(), signal.SIGKILL)
