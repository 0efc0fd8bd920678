"""Deterministic global-batch sampling shared by every data backend.

Epoch ``e`` is one seeded permutation of the split. Global step ``s`` takes the ``R*B`` samples
``perm[s*R*B : (s+1)*R*B]`` and rank ``r`` gets the ``r``-th block of ``B``. So every rank runs the
same number of steps (the remainder is dropped), a run on ``R`` ranks with batch ``B`` sees the
same global batches as one rank with batch ``R*B``, and resuming at step ``s`` is slicing.
"""

from __future__ import annotations

import numpy as np


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(num_samples)


def steps_per_epoch(num_samples: int, batch_size: int, world_size: int) -> int:
    return num_samples // (batch_size * world_size)


def rank_batches(
    num_samples: int, batch_size: int, rank: int, world_size: int, seed: int, epoch: int, start_step: int = 0
) -> list[list[int]]:
    """This rank's sample indices for each remaining step of ``epoch``."""
    perm = epoch_permutation(num_samples, seed, epoch)
    steps = steps_per_epoch(num_samples, batch_size, world_size)
    global_batch = batch_size * world_size
    return [
        perm[s * global_batch + rank * batch_size : s * global_batch + (rank + 1) * batch_size].tolist()
        for s in range(start_step, steps)
    ]


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """Seed for one sample's augmentations: the views depend on the sample, not on rank or worker."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1, dtype=np.uint64)[0] >> 1)
