"""Shuffling BN for the key encoder (He et al. 2020, Sec. 3.3).

The global key batch is permuted across ranks before the key encoder, so the BatchNorm
statistics of a key never come from the same sub-batch as its query, and un-permuted afterwards.
The permutation is drawn from a generator seeded by (seed, step), identical on every rank, so
no broadcast is needed and a resumed run draws the same one.

Rank ``r`` encodes the global samples ``perm[r*B:(r+1)*B]`` in that order (the global batch is the
concatenation of the ranks' batches in rank order). Only those samples move: an ``all_to_all``
sends each sample straight to the rank that encodes it, and a second one sends every output row
straight back to the sample's own rank, with per-pair split sizes computed from the permutation
on every rank. A rank receives on average ``(R-1)/R * B`` images and as many output rows per step,
where gathering the whole global batch received ``(R-1) * B`` of each. The results are the same
bits: the key encoder sees the same tensor, the rest is copying. Gloo (CPU) and NCCL both implement
``all_to_all_single`` with uneven splits. All ranks must have the same batch size.

On one rank there is nobody to shuffle with: the key encoder's BN then sees the same batch as
the query encoder's, the intra-batch shortcut MoCo's shuffle avoids. Use several ranks (or
SyncBN off and larger batches) for faithful MoCo BN behaviour; ilm_dist logs a warning.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ilm_dist import distributed as D


def step_permutation(size: int, seed: int, step: int, device: torch.device) -> Tensor:
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return torch.randperm(size, generator=gen).to(device)


@dataclass(frozen=True)
class Route:
    """One rank's part of the shuffle, from the global permutation (CPU tensors).

    ``send_index``: this rank's local rows in the order they are sent, grouped by destination rank
    (ascending) and, within one destination, in the order that rank encodes them;
    ``send_splits[d]``: how many go to rank ``d``. ``recv_order``: the position in this rank's
    encoded sub-batch of each received row (received rows come grouped by source rank);
    ``recv_splits[s]``: how many come from rank ``s``. The way back swaps the two.
    """

    send_index: Tensor
    send_splits: list[int]
    recv_order: Tensor
    recv_splits: list[int]

    def received_rows(self, rank: int) -> tuple[int, int]:
        """Rows received from other ranks: (images on the way out, outputs on the way back)."""
        return (
            sum(self.recv_splits) - self.recv_splits[rank],
            sum(self.send_splits) - self.send_splits[rank],
        )


def route(perm: Tensor, rank: int, batch: int) -> Route:
    """Where this rank's samples go for the key forward and where its sub-batch comes from."""
    perm = perm.cpu()
    world = perm.numel() // batch
    positions = (perm // batch == rank).nonzero().squeeze(1)  # where my samples sit in the permutation
    block = perm[rank * batch : (rank + 1) * batch]  # the global samples I encode, in order
    source = block // batch
    return Route(
        send_index=perm[positions] - rank * batch,
        send_splits=torch.bincount(positions // batch, minlength=world).tolist(),
        recv_order=torch.argsort(source, stable=True),
        recv_splits=torch.bincount(source, minlength=world).tolist(),
    )


def _pack(outputs: list[Tensor], batch: int) -> tuple[Tensor, list[tuple[torch.Size, torch.dtype, int]]]:
    """The per-sample outputs as one ``[batch, bytes]`` uint8 tensor, so one collective moves them all."""
    parts, meta = [], []
    for out in outputs:
        if out.shape[0] != batch:
            raise ValueError(f"shuffled_forward: fn returned {tuple(out.shape)}, expected {batch} rows")
        raw = out.detach().contiguous().reshape(batch, -1).view(torch.uint8)
        parts.append(raw)
        meta.append((out.shape, out.dtype, raw.shape[1]))
    return torch.cat(parts, dim=1), meta


def _unpack(packed: Tensor, meta: list[tuple[torch.Size, torch.dtype, int]]) -> list[Tensor]:
    outputs, start = [], 0
    for shape, dtype, width in meta:
        outputs.append(packed[:, start : start + width].contiguous().view(dtype).reshape(shape))
        start += width
    return outputs


@torch.no_grad()
def shuffled_forward(
    fn: Callable[[Tensor], list[Tensor]], images: Tensor, seed: int, step: int
) -> list[Tensor]:
    """Run ``fn`` (images -> list of per-sample tensors) on a cross-rank permutation of ``images``.

    Returns the outputs for this rank's own samples, in their original order. A channels-last
    batch is moved in its own memory layout and reaches ``fn`` channels-last.
    """
    world, rank = D.world_size(), D.rank()
    if world == 1:
        return fn(images)
    batch = images.shape[0]
    r = route(step_permutation(world * batch, seed, step, torch.device("cpu")), rank, batch)
    send_index, recv_order = (t.to(images.device, non_blocking=True) for t in (r.send_index, r.recv_order))

    nhwc = (
        images.dim() == 4
        and not images.is_contiguous()
        and images.is_contiguous(memory_format=torch.channels_last)
    )
    wire = images.permute(0, 2, 3, 1) if nhwc else images  # a contiguous view of the same bytes
    received = D.all_to_all_rows(wire[send_index], r.send_splits, r.recv_splits)
    mine = torch.empty_like(received)
    mine[recv_order] = received
    outputs = fn(mine.permute(0, 3, 1, 2) if nhwc else mine)

    packed, meta = _pack(outputs, batch)
    back = D.all_to_all_rows(packed[recv_order], r.recv_splits, r.send_splits)
    result = torch.empty_like(back)
    result[send_index] = back
    return _unpack(result, meta)
