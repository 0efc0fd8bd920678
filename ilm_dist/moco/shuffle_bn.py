"""Shuffling BN for the key encoder (He et al. 2020, Sec. 3.3).

The global key batch is permuted across ranks before the key encoder, so the BatchNorm
statistics of a key never come from the same sub-batch as its query, and un-permuted afterwards.
The permutation is drawn from a generator seeded by (seed, step), identical on every rank, so
no broadcast is needed and a resumed run draws the same one.

On one rank there is nobody to shuffle with: the key encoder's BN then sees the same batch as
the query encoder's, the intra-batch shortcut MoCo's shuffle avoids. Use several ranks (or
SyncBN off and larger batches) for faithful MoCo BN behaviour; ilm_dist logs a warning.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ilm_dist import distributed as D


def step_permutation(size: int, seed: int, step: int, device: torch.device) -> Tensor:
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return torch.randperm(size, generator=gen).to(device)


@torch.no_grad()
def shuffled_forward(
    fn: Callable[[Tensor], list[Tensor]], images: Tensor, seed: int, step: int
) -> list[Tensor]:
    """Run ``fn`` (images -> list of per-sample tensors) on a cross-rank permutation of ``images``.

    Returns the outputs for this rank's own samples, in their original order.
    """
    world, rank = D.world_size(), D.rank()
    if world == 1:
        return fn(images)
    batch = images.shape[0]
    gathered = D.all_gather_no_grad(images)
    perm = step_permutation(gathered.shape[0], seed, step, images.device)
    mine = perm[rank * batch : (rank + 1) * batch]
    outputs = fn(gathered[mine])
    inverse = torch.argsort(perm)[rank * batch : (rank + 1) * batch]
    return [D.all_gather_no_grad(out.contiguous())[inverse] for out in outputs]
