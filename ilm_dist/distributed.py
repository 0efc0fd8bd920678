"""Process-group helpers that also work without one (rank 0 of world 1).

Everything that talks to ``torch.distributed`` in ilm_dist goes through here, so the model and
the losses stay free of distribution code.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def dist_info() -> DistInfo:
    """Rank/world of the default group, or of the launcher's environment before it exists."""
    if is_initialized():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        return DistInfo(dist.get_rank(), dist.get_world_size(), local)
    return DistInfo(
        int(os.environ.get("RANK", "0")),
        int(os.environ.get("WORLD_SIZE", "1")),
        int(os.environ.get("LOCAL_RANK", "0")),
    )


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


@torch.no_grad()
def all_gather_no_grad(tensor: Tensor) -> Tensor:
    """Concatenate ``tensor`` from all ranks along dim 0 (rank order); no autograd."""
    if world_size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: Tensor, dim: int, group) -> Tensor:
        parts = [
            torch.empty_like(tensor, memory_format=torch.contiguous_format)
            for _ in range(dist.get_world_size(group))
        ]
        dist.all_gather(parts, tensor.contiguous(), group=group)
        ctx.dim, ctx.group = dim, group
        ctx.start, ctx.length = dist.get_rank(group) * tensor.shape[dim], tensor.shape[dim]
        return torch.cat(parts, dim=dim)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, group=ctx.group)
        return grad.narrow(ctx.dim, ctx.start, ctx.length), None, None


def all_gather_with_grad(tensor: Tensor, dim: int = 0, group=None) -> Tensor:
    """Concatenate ``tensor`` from all ranks of ``group`` along ``dim`` (rank order), keeping autograd.

    The backward sums the gradients every rank computed for the gathered tensor (all_reduce) and
    returns this rank's slice. So a loss that every rank computes identically on the gathered batch,
    with parameter gradients averaged by the data-parallel engine, gets exactly the single-process
    gradient. (``torch.distributed.nn.functional.all_gather`` is deprecated, and under gloo its
    backward mis-orders gradients that arrive non-contiguous.)
    """
    if not is_initialized() or dist.get_world_size(group) == 1:
        return tensor
    return _GatherWithGrad.apply(tensor, dim, group)


def broadcast_(tensor: Tensor, src: int = 0) -> Tensor:
    if world_size() > 1:
        dist.broadcast(tensor, src)
    return tensor


def all_reduce_mean_(tensor: Tensor) -> Tensor:
    if world_size() > 1:
        dist.all_reduce(tensor)
        tensor /= world_size()
    return tensor


def all_gather_object(obj: object) -> list[object]:
    """Every rank's ``obj`` (picklable), in rank order."""
    if world_size() == 1:
        return [obj]
    out: list[object] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def shutdown() -> None:
    """Destroy the process group, if any; exiting with a live gloo group can abort in its C++ threads."""
    if is_initialized():
        dist.destroy_process_group()


def on_main(fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 only and return its result on every rank (so it is also a barrier).

    An exception in ``fn`` is raised on every rank (same type and message), so a failure on rank 0
    (bad input, a file it cannot write) stops all ranks instead of leaving them waiting in the next
    collective. Result and exception must be picklable.
    """
    if world_size() == 1:
        return fn()
    box: list[object] = [None]
    if rank() == 0:
        try:
            box[0] = (True, fn())
        except Exception as err:  # raised again below, on every rank
            box[0] = (False, err)
    dist.broadcast_object_list(box, src=0)
    ok, value = box[0]
    if not ok:
        raise value
    return value
