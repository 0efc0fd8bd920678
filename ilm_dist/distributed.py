"""The process group: starting it, and collectives that also work without one (rank 0 of world 1).

The collectives ilm_dist calls itself go through here (``tests/test_architecture.py`` names the few
modules allowed to call ``torch.distributed`` directly): shuffle-BN's all_to_all, the key queue's
all-gather, the Barlow Twins loss over the global batch (:func:`all_gather_with_grad`), the logged loss,
the NaN watch, evaluation's sharded passes and rank 0's decisions (:func:`on_main`); the model holds no
distribution code. What torch and DeepSpeed bring communicates over the same group on its own:
the DeepSpeed engine and DDP (evaluation) all-reduce gradients, SyncBatchNorm its statistics.

:func:`init_process_group` joins the launcher's group (``deepspeed``, ``torchrun`` or SLURM's variables)
or makes a world of one for plain ``python``; on a machine without CUDA ``DS_ACCELERATOR=cpu`` selects
DeepSpeed's CPU accelerator and gloo, which must be set before deepspeed is imported
(:func:`select_accelerator`).
"""

from __future__ import annotations

import datetime
import os
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from ilm_dist.errors import InputError

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def select_accelerator() -> str:
    """Pick DeepSpeed's accelerator before it is imported: ``cuda`` when usable, else ``cpu``.

    ``DS_ACCELERATOR=cuda`` where torch sees no CUDA device raises :class:`InputError` instead of a CPU run.
    """
    requested = os.environ.get("DS_ACCELERATOR")
    if requested == "cuda" and not torch.cuda.is_available():
        raise InputError(f"DS_ACCELERATOR=cuda, but {_why_no_cuda()}")
    if requested is None and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"
    return os.environ.get("DS_ACCELERATOR", "cuda")


def _why_no_cuda() -> str:
    """Why this process has no CUDA device to run on, for an error message."""
    if torch.cuda.is_available():
        return f"DS_ACCELERATOR={os.environ.get('DS_ACCELERATOR')} selects DeepSpeed's CPU accelerator"
    build = f"a CUDA {torch.version.cuda} build" if torch.version.cuda else "a CPU-only build"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    shown = "" if visible is None else f", CUDA_VISIBLE_DEVICES={visible!r}"
    return f"torch {torch.__version__} ({build}{shown}) sees no CUDA device"


def free_port() -> int:
    """A TCP port on localhost that is free now (for a rendezvous the caller starts right away)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _skip_shm_allreduce_op() -> None:
    """Keep DeepSpeed's CPU backend from building and mapping its shared-memory all-reduce op.

    On the CPU accelerator ``deepspeed.init_distributed`` JIT-compiles that op (about a minute on two
    cores, on the first run on a machine) and maps a ~66 MiB /dev/shm segment per rank that it never
    unlinks, so every run, finished or killed, left its segments behind (sglang#38638 hit the same). The op
    serves only ``inference_all_reduce``, which training never calls; without it that call falls back to
    ``torch.distributed``. DeepSpeed consults this table of compatible ops before building
    (``deepspeed.comm.torch.build_shm_op``); tests/integration/test_shm_segments.py fails if a DeepSpeed ignores it.
    """
    import deepspeed.ops

    compatible = getattr(deepspeed.ops, "__compatible_ops__", None)
    if compatible is not None:
        compatible["deepspeed_shm_comm"] = False


def init_process_group(
    backend: Literal["auto", "nccl", "gloo"] = "auto", timeout_s: float = 600
) -> tuple[DistInfo, torch.device]:
    """Join the launcher's process group (or make a world of one) and return this rank and its device.

    ``backend="auto"``: NCCL on GPUs, gloo on CPUs; ``"nccl"`` without CUDA raises :class:`InputError`
    (it asks for GPUs: a run that lost them must not go on as a CPU run). ``timeout_s``: how long a collective
    waits for a rank that stopped answering before it fails the job. Without a launcher (no ``WORLD_SIZE`` and
    ``MASTER_PORT``) the world of one gets a fresh rendezvous port, which is removed from the environment
    again once the group exists, so a process started later from this one (a subprocess, a test) does not
    inherit a port in use.
    """
    accelerator = select_accelerator()
    if backend == "nccl" and accelerator != "cuda":
        raise InputError(
            f"engine.dist_backend=nccl needs CUDA, but {_why_no_cuda()} (auto or gloo: CPU ranks)"
        )
    launched = "WORLD_SIZE" in os.environ and "MASTER_PORT" in os.environ
    rendezvous = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    if not launched:
        os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", **rendezvous})
    try:
        import deepspeed

        if accelerator == "cpu":
            _skip_shm_allreduce_op()

        if backend == "auto":
            backend = "nccl" if accelerator == "cuda" else "gloo"
        timeout = datetime.timedelta(seconds=timeout_s)
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, timeout=timeout)
    finally:
        if not launched:
            for key in rendezvous:
                os.environ.pop(key, None)
    info = dist_info()
    if accelerator == "cpu":
        return info, torch.device("cpu")
    torch.cuda.set_device(info.local_rank)
    return info, torch.device("cuda", info.local_rank)


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


def all_to_all_rows(rows: Tensor, send_splits: list[int], recv_splits: list[int]) -> Tensor:
    """Send ``send_splits[d]`` consecutive rows of ``rows`` to rank ``d``; returns the rows received,
    ``recv_splits[s]`` of them from rank ``s``, grouped by source rank in rank order (uneven splits allowed)."""
    out = rows.new_empty((sum(recv_splits), *rows.shape[1:]))
    dist.all_to_all_single(out, rows.contiguous(), recv_splits, send_splits)
    return out


def all_reduce_sum_(tensor: Tensor) -> Tensor:
    """Sum ``tensor`` over the ranks in place (no-op on one rank)."""
    if world_size() > 1:
        dist.all_reduce(tensor)
    return tensor


def all_reduce_mean_(tensor: Tensor) -> Tensor:
    """Average ``tensor`` over the ranks in place (no-op on one rank)."""
    if world_size() > 1:
        all_reduce_sum_(tensor).div_(world_size())
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
    """Destroy the process group, if any; exiting with a live gloo group can abort in its C++ threads.

    Through DeepSpeed when DeepSpeed started it, which then also drops its cached groups: destroyed by torch
    alone, the next group in this process failed in ``deepspeed.initialize`` ("Group ... is not
    registered"), e.g. a second pretraining run in one notebook or test process."""
    if not is_initialized():
        return
    comm = sys.modules.get("deepspeed.comm")
    if comm is not None and comm.is_initialized():
        comm.destroy_process_group()
    else:
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
