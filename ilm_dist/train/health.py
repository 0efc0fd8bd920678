"""Run health: non-finite losses found without a sync per step, and per-rank heartbeats.

:class:`NanWatch` keeps each step's loss terms on the device and checks them in one transfer at
log and checkpoint time, naming the first bad step and term, so no checkpoint is ever written
after a non-finite loss and the hot loop never waits on ``.item()``.

:class:`Heartbeat` lets a surviving rank say *which* rank went silent when a collective fails:
every rank touches its file in ``output_dir/heartbeat/`` (at most every few seconds) with its step, and
on a failure every survivor checks in at once; whoever has not after a grace period is named.
"""

from __future__ import annotations

import os
import time

import torch

from ilm_dist import distributed as D
from ilm_dist.train.run_dir import RunDir


class NonFiniteLoss(FloatingPointError):
    """A loss term became NaN or inf; the message names the step and the term."""


class NanWatch:
    def __init__(self, names: list[str]):
        self.names = names
        self.steps: list[int] = []
        self.values: list[torch.Tensor] = []

    def record(self, step: int, terms: dict[str, torch.Tensor]) -> None:
        self.steps.append(step)
        self.values.append(torch.stack([terms[n].detach().float() for n in self.names]))

    def check(self) -> None:
        """Raise :class:`NonFiniteLoss` for the first recorded step with a non-finite term; then forget.

        Collective: every rank calls it at the same point and shares its verdict first, so a non-finite loss
        on one rank stops every rank with the same message (naming that rank) instead of leaving the others in
        the next collective until its timeout (NCCL; gloo fails fast)."""
        found = self._first_non_finite()
        verdicts = D.all_gather_object(found)  # [found] without a group of several ranks
        bad = [(rank, message) for rank, message in enumerate(verdicts) if message is not None]
        if bad:
            rank, message = bad[0]
            raise NonFiniteLoss(message + (f" on rank {rank}" if len(verdicts) > 1 else ""))

    def _first_non_finite(self) -> str | None:
        """The first recorded step with a non-finite term, as a message; None if all are finite. Forgets them."""
        if not self.values:
            return None
        values = torch.stack(self.values).cpu()
        steps, self.steps, self.values = self.steps, [], []
        bad = ~torch.isfinite(values)
        if not bad.any():
            return None
        row = int(bad.any(dim=1).nonzero()[0])
        terms = {n: float(v) for n, v, b in zip(self.names, values[row], bad[row], strict=True) if b}
        return f"step {steps[row]}: non-finite loss term(s) {terms}"


class Heartbeat:
    def __init__(self, run: RunDir, rank: int, world_size: int, period_s: float = 5.0):
        self.run = run
        run.heartbeats.mkdir(parents=True, exist_ok=True)
        self.rank, self.world_size, self.period_s = rank, world_size, period_s
        self.last = 0.0

    def beat(self, step: int, force: bool = False) -> None:
        now = time.time()
        if force or now - self.last >= self.period_s:
            # write + rename: a survivor reading this file while it is rewritten never sees it empty
            path = self.run.heartbeat(self.rank)
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text(f"{step} {now:.3f}\n")
            os.replace(tmp, path)
            self.last = now

    def _last(self, rank: int) -> tuple[str, float] | None:
        """``(step, time)`` of the rank's last heartbeat; None when it has none (or an unreadable one)."""
        try:
            step, stamp = self.run.heartbeat(rank).read_text().split()
            return step, float(stamp)
        except (OSError, ValueError):
            return None

    def diagnose(self, step: int, grace_s: float = 3.0) -> str:
        """After a failure: keep checking in for ``grace_s`` while the other survivors do the same, then
        name the ranks not heard from since the failure, with their last step (the dead or hung ones)."""
        failure = time.time()
        while time.time() < failure + grace_s:
            self.beat(step, force=True)
            time.sleep(0.25)
        silent = []
        for r in range(self.world_size):
            last = self._last(r)
            if r == self.rank:
                continue
            if last is None:
                silent.append(f"rank {r} (never checked in)")
            elif last[1] < failure:
                silent.append(f"rank {r} (last alive at step {last[0]}, {failure - last[1]:.0f} s before)")
        return "not heard from since the failure: " + (", ".join(silent) if silent else "none")
