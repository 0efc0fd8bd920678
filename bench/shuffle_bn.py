"""Shuffle-BN communication per rank and step: all_gather (before) against all_to_all (now).

    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 deepspeed --num_gpus 2 bench/shuffle_bn.py   # gloo, CPU ranks
    deepspeed --num_gpus 8 bench/shuffle_bn.py                                          # NCCL, one GPU each

Both implementations (``ilm_dist.moco.shuffle_bn``) run the same permutations on the same images. The
key function is a stand-in that costs next to nothing, so the time is the shuffle alone: it returns the
first ``--features`` values of every image as fp32 (3,968 = ResNet-50's 128-d key plus the reduced
blocks the intermediate loss uses, as in ``ilm_dist.plan``). Per implementation: the median milliseconds
of a step (slowest rank), the bytes each rank receives from other ranks counted from the collectives'
sizes (all_gather: ``(R-1) * B`` images and output rows; all_to_all: the split sizes actually used), and,
for CPU ranks on Linux, the TCP bytes the process received during the step, measured by the kernel (the
growth of ``bytes_received`` over the process's sockets in ``ss -tinp``: gloo's traffic and its framing).

Writes ``bench/results/shuffle_bn_<device>_r<ranks>.json`` (``device``, ``commit``, ``command``, ``settings``,
``implementations``); the outputs of the two implementations are checked to be equal on every step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from common import ROOT, source_commit, write_result
from torch import Tensor

from ilm_dist import distributed as D
from ilm_dist.moco.shuffle_bn import route, shuffled_forward, step_permutation


@torch.no_grad()
def all_gather_shuffled_forward(
    fn: Callable[[Tensor], list[Tensor]], images: Tensor, seed: int, step: int
) -> list[Tensor]:
    """The implementation before ``all_to_all``, same results: every rank gathers the whole global batch
    and every rank's outputs, ``(R-1) * B`` samples of each. The baseline of this benchmark and the
    reference of the shuffle test (tests/dist_scripts/shuffle_bn.py)."""
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


IMPLS = {"all_gather": all_gather_shuffled_forward, "all_to_all": shuffled_forward}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=64, help="images per rank")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--dtype", default="bfloat16", help="image dtype on the wire (the trainer's)")
    parser.add_argument("--features", type=int, default=3968, help="fp32 values per sample sent back")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--local_rank", type=int)  # added by the deepspeed launcher
    return parser.parse_args()


def read_bytes() -> int | None:
    """TCP bytes this process has received so far: the kernel's per-socket ``bytes_received`` (``ss -ti``)."""
    try:
        out = subprocess.run(["ss", "-tinpH"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    total, mine = 0, False
    for line in out.splitlines():
        if not line[:1].isspace():  # a socket's line; its tcp_info follows on an indented line
            mine = f"pid={os.getpid()}," in line
        elif mine:
            total += sum(int(f.split(":")[1]) for f in line.split() if f.startswith("bytes_received:"))
    return total


def main() -> None:
    args = parse_args()
    cuda = torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") != "cpu"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda") if cuda else torch.device("cpu")
    dtype = getattr(torch, args.dtype)
    shape = (args.batch, 3, args.size, args.size)
    image_bytes = 3 * args.size**2 * dtype.itemsize
    row_bytes = args.features * 4

    def fn(x: torch.Tensor) -> list[torch.Tensor]:
        return [x.flatten(1)[:, : args.features].float()]

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    times: dict[str, list[float]] = {name: [] for name in IMPLS}
    read: dict[str, list[int]] = {name: [] for name in IMPLS}
    counted: dict[str, list[int]] = {name: [] for name in IMPLS}
    same = True
    for step in range(args.warmup + args.steps):
        gen = torch.Generator().manual_seed(args.seed * 7919 + step * 31 + rank)
        images = torch.randn(shape, generator=gen).to(device, dtype)
        outputs = {}
        for name in list(IMPLS)[:: 1 if step % 2 else -1]:  # alternate the order against drift
            dist.barrier()
            sync()
            before, t0 = read_bytes(), time.perf_counter()
            outputs[name] = IMPLS[name](fn, images, args.seed, step)
            sync()
            elapsed, after = time.perf_counter() - t0, read_bytes()
            if step < args.warmup:
                continue
            times[name].append(elapsed * 1e3)
            if before is not None and after is not None:
                read[name].append(after - before)
            if name == "all_gather":
                counted[name].append((world - 1) * args.batch * (image_bytes + row_bytes))
            else:
                perm = step_permutation(world * args.batch, args.seed, step, torch.device("cpu"))
                images_in, rows_back = route(perm, rank, args.batch).received_rows(rank)
                counted[name].append(images_in * image_bytes + rows_back * row_bytes)
        same &= all(torch.equal(a, b) for a, b in zip(*outputs.values(), strict=True))
    assert same, "all_to_all and all_gather shuffles differ"
    results = {}
    for name in IMPLS:
        per_rank = [None] * world
        mine = {"ms": statistics.median(times[name]), "read": read[name], "counted": counted[name]}
        dist.all_gather_object(per_rank, mine)
        results[name] = {
            "step_ms_slowest_rank": round(max(p["ms"] for p in per_rank), 2),
            "step_ms_per_rank": [round(p["ms"], 2) for p in per_rank],
            "bytes_received_per_rank_counted": round(
                statistics.mean(c for p in per_rank for c in p["counted"])
            ),
            "bytes_received_per_rank_measured_tcp": round(
                statistics.mean(b for p in per_rank for b in p["read"])
            )
            if all(p["read"] for p in per_rank)
            else None,
        }
    if rank == 0:
        predicted = {
            "all_gather": (world - 1) * args.batch * (image_bytes + row_bytes),
            "all_to_all (expected, (R-1)/R of the batch)": round(
                (world - 1) / world * args.batch * (image_bytes + row_bytes)
            ),
        }
        name = torch.cuda.get_device_name().lower().replace(" ", "_") if cuda else "cpu"
        result = {
            "device": f"{torch.cuda.get_device_name()} x {world} (nccl)"
            if cuda
            else f"cpu ({world} gloo ranks on {os.cpu_count()} cores, {torch.get_num_threads()} threads each)",
            "commit": source_commit("ilm_dist/moco/shuffle_bn.py", "bench/shuffle_bn.py"),
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "torch": torch.__version__,
            "settings": {**{k: v for k, v in vars(args).items() if k != "local_rank"}, "ranks": world},
            "bytes_per_sample": {"image": image_bytes, "outputs": row_bytes},
            "predicted_bytes_received_per_rank": predicted,
            "identical_outputs": same,
            "implementations": results,
        }
        out = ROOT / "bench" / "results" / f"shuffle_bn_{name}_r{world}.json"
        print(json.dumps(result, indent=2))
        write_result(result, out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
