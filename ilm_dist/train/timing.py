"""Optional per-phase timing of a training step, free when disabled.

``Trainer.train_step`` wraps each phase in ``self.timer.phase(name)``. The trainer's timer is disabled:
``phase`` then returns one shared ``nullcontext`` (no clock read, no allocation, no sync), so the step
computes exactly what it computes without the hooks. A benchmark passes an enabled one
(``Trainer(cfg, timer=StepTimer(device, enabled=True))``) and calls :meth:`StepTimer.finish_step` after
each step.

How phases are timed when enabled:

- CPU: ``time.perf_counter`` at every phase boundary.
- CUDA: a CUDA event recorded on the current stream at every boundary, and one
  ``torch.cuda.synchronize`` in :meth:`finish_step`. No sync inside the step, so the host still runs
  ahead of the GPU within it; a phase's time is the GPU-timeline time between its two events, i.e.
  its kernels' time when the GPU is the bottleneck, and also the time the GPU waited for the host
  to issue them when the host is. Since the previous step ended with a sync, a phase timed before
  any GPU work (the benchmark's ``data`` wait) measures host time.

Phases do not nest. :meth:`StepTimer.split` re-labels the rest of the open phase (e.g. the loss
computed after the encoder inside one engine forward); :meth:`split_after` does it from a module's
forward hook.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

_DISABLED = nullcontext()
Mark = float | torch.cuda.Event


class StepTimer:
    """Milliseconds per named phase of one step; a no-op unless ``enabled``."""

    def __init__(self, device: torch.device | None = None, enabled: bool = False):
        self.enabled = enabled
        self.device = device
        self._cuda = enabled and device is not None and device.type == "cuda"
        self._open: tuple[str, Mark] | None = None
        self._spans: list[tuple[str, Mark, Mark]] = []

    def phase(self, name: str) -> AbstractContextManager[None]:
        """Time the ``with`` block as phase ``name`` (repeated names add up within a step)."""
        return self._timed(name) if self.enabled else _DISABLED

    @contextmanager
    def _timed(self, name: str) -> Iterator[None]:
        if self._open is not None:
            raise RuntimeError(f"StepTimer: phase {name!r} opened inside phase {self._open[0]!r}")
        self._open = (name, self._mark())
        try:
            yield
        finally:
            self._close(self._mark())

    def split(self, name: str) -> None:
        """End the open phase here and count the rest of its block as ``name``; no-op outside a phase."""
        if self._open is None:
            return
        mark = self._mark()
        self._close(mark)
        self._open = (name, mark)

    def split_after(self, module: nn.Module, name: str) -> RemovableHandle:
        """:meth:`split` into ``name`` whenever ``module``'s forward returns."""
        return module.register_forward_hook(lambda *_: self.split(name))

    def finish_step(self) -> dict[str, float]:
        """End the step (on CUDA: wait for it) and return its milliseconds per phase; ``{}`` if disabled."""
        if self._cuda:
            torch.cuda.synchronize(self.device)
        ms: dict[str, float] = {}
        for name, start, end in self._spans:
            ms[name] = ms.get(name, 0.0) + self._elapsed_ms(start, end)
        self._spans = []
        return ms

    def _mark(self) -> Mark:
        if not self._cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def _close(self, end: Mark) -> None:
        name, start = self._open
        self._spans.append((name, start, end))
        self._open = None

    def _elapsed_ms(self, start: Mark, end: Mark) -> float:
        return start.elapsed_time(end) if self._cuda else (end - start) * 1e3
