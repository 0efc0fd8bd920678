"""Deterministic global-batch sampling shared by every data backend.

Epoch ``e`` is one seeded permutation of the split. Global step ``s`` takes the ``R*B`` samples
``perm[s*R*B : (s+1)*R*B]`` and rank ``r`` gets the ``r``-th block of ``B``. So every rank runs the
same number of steps (the remainder is dropped), a run on ``R`` ranks with batch ``B`` sees the
same global batches as one rank with batch ``R*B``, and resuming at step ``s`` is slicing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class GlobalBatch:
    """The samples of one optimizer step: ``per_rank`` on each of ``ranks``, in ``accumulation`` micro-steps
    (the one place the global batch is computed: trainer, run plan, dry run and sampling read it here)."""

    per_rank: int
    ranks: int
    accumulation: int = 1

    @property
    def per_micro_step(self) -> int:
        """The samples of one loader step of every rank (``R*B``)."""
        return self.per_rank * self.ranks

    @property
    def samples(self) -> int:
        """The samples of one optimizer step (``R*B*accumulation``), which scale the learning rate."""
        return self.per_micro_step * self.accumulation


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(num_samples)


def steps_per_epoch(num_samples: int, batch_size: int, world_size: int) -> int:
    return num_samples // GlobalBatch(batch_size, world_size).per_micro_step


def rank_batches(
    num_samples: int, batch_size: int, rank: int, world_size: int, seed: int, epoch: int, start_step: int = 0
) -> list[list[int]]:
    """This rank's sample indices for each remaining step of ``epoch``."""
    perm = epoch_permutation(num_samples, seed, epoch)
    steps = steps_per_epoch(num_samples, batch_size, world_size)
    global_batch = GlobalBatch(batch_size, world_size).per_micro_step
    return [
        perm[s * global_batch + rank * batch_size : s * global_batch + (rank + 1) * batch_size].tolist()
        for s in range(start_step, steps)
    ]


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """Seed for one sample's augmentations: the views depend on the sample, not on rank or worker."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1, dtype=np.uint64)[0] >> 1)


def rank_shard(num_samples: int, batch_size: int, rank: int, world_size: int) -> slice:
    """Rank ``rank``'s part of ``num_samples`` ordered samples: a contiguous range of whole batches.

    The batches are those one process would make (``batch_size`` each, the last one shorter); they are
    split as evenly as possible over the ranks in rank order, so the shards are disjoint, cover every
    sample once, and a rank may get none when there are fewer batches than ranks.
    """
    batches = -(-num_samples // batch_size)
    first, last = batches * rank // world_size, batches * (rank + 1) // world_size
    return slice(min(first * batch_size, num_samples), min(last * batch_size, num_samples))


def seeded_draw(num_samples: int, cap: int | None, seed: int = 0) -> list[int]:
    """A seeded draw of ``min(num_samples, cap)`` indices (all of them when ``cap`` is None), sorted for
    sequential reads: the same samples in every run on a split."""
    if cap is None or cap >= num_samples:
        return list(range(num_samples))
    return sorted(np.random.default_rng(seed).permutation(num_samples)[:cap].tolist())
