"""CPU placement: how many intra-op threads each rank runs, and on which cores it and its loader run.

Every process ilm_dist starts (pretraining ranks, evaluation commands, experiment cells, sweep trials, the
test suite's workers) decides here. Torch's default, one intra-op thread per core in every process, makes
two ranks on two cores run four OpenMP threads plus loader workers: each rank's threads wait at OpenMP
barriers for threads the other rank has preempted, and a step takes 3-5x longer than with one thread each
(bench/NOTES.md, section h). ``torchrun`` sets ``OMP_NUM_THREADS=1`` for the same reason; DeepSpeed's
``--bind_cores_to_rank`` binds with ``numactl``, which many machines lack.

The rule (:func:`plan_placement`): the cores this process may use (``os.sched_getaffinity``) are cut into one
contiguous block per rank on the node (``LOCAL_SIZE`` from the deepspeed launcher, ``LOCAL_WORLD_SIZE``
from torchrun, else 1); a rank binds itself to its block and runs one intra-op thread per core of it (on a
GPU rank, the cores its loader workers need are left to them); its loader workers inherit the binding
and run one thread each. With fewer cores than ranks, ranks share cores round-robin with one thread each.
``cpu.threads`` in the run config, or ``OMP_NUM_THREADS`` in the environment, sets the thread count
instead and is reported; ``OMP_NUM_THREADS`` also leaves the binding to whoever set it (a scheduler, Ray,
``deepspeed --bind_cores_to_rank``), and so does ``cpu.bind: false``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from ilm_dist.errors import InputError

log = logging.getLogger("ilm_dist")
THREADS_ENV = "OMP_NUM_THREADS"
_job_cores: tuple[int, ...] | None = None  # the mask before this process bound itself


@dataclass
class CpuConfig:
    """The run config's ``cpu`` section."""

    threads: int | None = None  # intra-op threads per rank; None: the rank's share of the cores
    bind: bool = True  # pin each rank, and its loader workers, to its own cores


@dataclass(frozen=True)
class CpuPlacement:
    """One node's plan: every local rank's cores, the threads each runs, and its loader workers."""

    blocks: tuple[tuple[int, ...], ...]  # cores of each local rank, in local-rank order
    threads: int  # intra-op threads per rank
    loader_workers: int  # per rank, one thread each
    bound: bool  # whether ranks are pinned to their blocks
    source: str  # where ``threads`` came from: "auto", "cpu.threads" or "OMP_NUM_THREADS"

    @property
    def local_ranks(self) -> int:
        return len(self.blocks)

    def cores_of(self, local_rank: int) -> tuple[int, ...]:
        return self.blocks[local_rank % len(self.blocks)]

    def describe(self) -> str:
        """E.g. ``2 ranks x 1 thread, cores 0/1, 1 loader worker x 1 thread per rank``."""
        ranks = f"{self.local_ranks} rank{'s' if self.local_ranks > 1 else ''}"
        threads = f"{self.threads} thread{'s' if self.threads > 1 else ''}"
        where = "cores " + "/".join(_core_list(b) for b in self.blocks) if self.bound else "not bound"
        workers = self.loader_workers
        loader = f"{workers} loader worker{'s' if workers != 1 else ''} x 1 thread per rank"
        source = "" if self.source == "auto" else f" (threads from {self.source})"
        return f"{ranks} x {threads}, {where}, {loader}{source}"


def _core_list(cores: Sequence[int]) -> str:
    """``0-3`` for a run of cores, ``0,2`` otherwise."""
    if len(cores) > 1 and list(cores) == list(range(cores[0], cores[-1] + 1)):
        return f"{cores[0]}-{cores[-1]}"
    return ",".join(map(str, cores))


def cpu_flags() -> set[str]:
    """This CPU's feature flags (the ``flags`` line of /proc/cpuinfo; empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as info:
            line = next((line for line in info if line.startswith("flags")), ":")
    except OSError:
        return set()
    return set(line.split(":", 1)[1].split())


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX bf16 tiles (``amx_bf16``)."""
    return "amx_bf16" in cpu_flags()


def available_cores() -> tuple[int, ...]:
    """The cores this process may run on (its affinity mask; all cores where the OS has no masks)."""
    if hasattr(os, "sched_getaffinity"):
        return tuple(sorted(os.sched_getaffinity(0)))
    return tuple(range(os.cpu_count() or 1))


def local_ranks(environ: Mapping[str, str] = os.environ) -> tuple[int, int]:
    """(this process's rank on the node, ranks on the node) from the launcher's environment."""
    size = environ.get("LOCAL_SIZE") or environ.get("LOCAL_WORLD_SIZE") or "1"
    return int(environ.get("LOCAL_RANK", "0")), int(size)


def split_cores(cores: Sequence[int], ranks: int) -> tuple[tuple[int, ...], ...]:
    """One contiguous, equal block per rank (spare cores unused); round-robin single cores when short."""
    if len(cores) < ranks:
        return tuple((cores[r % len(cores)],) for r in range(ranks))
    size = len(cores) // ranks
    return tuple(tuple(cores[r * size : (r + 1) * size]) for r in range(ranks))


def _env_threads(environ: Mapping[str, str]) -> int | None:
    text = environ.get(THREADS_ENV)
    if text is None or text == "":
        return None
    if not text.isdigit() or int(text) < 1:
        raise InputError(f"environment variable {THREADS_ENV}={text!r}: expected a positive whole number")
    return int(text)


def plan_placement(
    ranks: int,
    loader_workers: int,
    config: CpuConfig | None = None,
    cores: Sequence[int] | None = None,
    gpu: bool = False,
    environ: Mapping[str, str] = os.environ,
) -> CpuPlacement:
    """The placement of ``ranks`` ranks on ``cores`` (default: :func:`available_cores`), each with
    ``loader_workers`` loader processes. ``gpu``: the ranks compute on GPUs, so their loader workers get
    cores of their own and the rank keeps the rest (at least one)."""
    config = config or CpuConfig()
    blocks = split_cores(list(cores or available_cores()), ranks)
    env_threads = _env_threads(environ)
    if config.threads is not None:
        threads, source = config.threads, "cpu.threads"
    elif env_threads is not None:
        threads, source = env_threads, THREADS_ENV
    else:
        share = len(blocks[0])
        threads, source = max(1, share - loader_workers) if gpu else share, "auto"
    bound = config.bind and env_threads is None
    return CpuPlacement(blocks, threads, loader_workers, bound, source)


def bind_process(cores: Sequence[int]) -> None:
    """Pin every thread of this process (and so the threads and processes it starts later) to ``cores``."""
    for task in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(task), cores)
        except (ProcessLookupError, PermissionError):  # a thread that ended meanwhile
            continue


def apply_placement(placement: CpuPlacement, local_rank: int) -> None:
    """Bind this rank to its cores (when the placement binds) and set torch's intra-op threads."""
    if placement.bound and hasattr(os, "sched_setaffinity"):
        bind_process(placement.cores_of(local_rank))
    torch.set_num_threads(placement.threads)


def place_this_process(
    loader_workers: int, config: CpuConfig | None = None, gpu: bool = False, announce: bool = True
) -> CpuPlacement:
    """Plan this node from the launcher's environment and apply this rank's part; with ``announce`` local
    rank 0 logs the plan. Planned again in the same process (a second trainer), it plans over the cores
    it had before it bound itself."""
    global _job_cores
    _job_cores = _job_cores or available_cores()
    rank, ranks = local_ranks()
    placement = plan_placement(ranks, loader_workers, config, cores=_job_cores, gpu=gpu)
    apply_placement(placement, rank)
    if announce and rank == 0:
        log.info("cpu placement: %s", placement.describe())
    return placement


def current_placement() -> dict[str, object]:
    """What this process runs with now, read back from torch and the OS: threads and cores."""
    return {"threads": torch.get_num_threads(), "cores": list(available_cores())}
