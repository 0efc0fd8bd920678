"""Ordered parallel map over a process pool, with a tqdm progress bar."""

from __future__ import annotations

import multiprocessing
import signal
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")
R = TypeVar("R")


def parallel_map(
    fn: Callable[[T], R],
    items: Sequence[T],
    workers: int,
    desc: str,
    weight: Callable[[T], int] = lambda item: 1,
    quiet: bool = False,
) -> list[R]:
    """``[fn(item) for item in items]`` on ``workers`` processes (inline for 1); the bar advances by
    ``weight(item)`` per finished item.  A worker's exception propagates and stops the pool."""
    total = sum(weight(item) for item in items)
    with tqdm(total=total, desc=desc, disable=quiet, dynamic_ncols=True) as bar:
        results = []
        for item, result in zip(items, _run(fn, items, workers), strict=True):
            results.append(result)
            bar.update(weight(item))
        return results


def _run(fn: Callable[[T], R], items: Sequence[T], workers: int) -> Iterator[R]:
    if workers <= 1 or len(items) <= 1:
        yield from map(fn, items)
        return
    chunksize = max(1, min(64, len(items) // (workers * 8)))
    # Workers ignore SIGINT: Ctrl-C reaches the whole process group, and only the parent should handle it
    # (one message, cleanup) while leaving the pool's `with` terminates the workers.
    with multiprocessing.Pool(min(workers, len(items)), initializer=_ignore_sigint) as pool:
        yield from pool.imap(fn, items, chunksize=chunksize)


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
