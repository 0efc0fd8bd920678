"""ilm_dist's CPU pretraining step against the bound: a plain PyTorch step of the same shape, side by side.

For each rank count in ``--ranks`` the script starts that many ranks (plain ``python`` for one,
``DS_ACCELERATOR=cpu deepspeed --num_gpus R`` otherwise) under one CPU placement (``--placement``:
``ilm_dist``, what every ilm_dist process now applies, or ``torch_default``, one intra-op thread per core in
every rank and no binding, as before). Every rank builds, in that placement:

- ``bound``: a plain PyTorch MoCo step of the same model, batch, image size, precision and memory format:
  torchvision ResNet + MoCo head run block by block (``bench/moco_baseline.py``'s ``BaselineEncoder``), query forward + backward (InfoNCE against the queue, plus the pooled-MSE
  block loss when ``loss.type`` is ``mse``), key forward, EMA, SGD; ``DistributedDataParallel`` on 2+
  ranks. Nothing of ilm_dist but the batches;
- ``ilm_step``: ``Trainer.train_step`` on the same in-memory batches (data loading excluded);
- ``ilm_with_data``: ``Trainer.train_step`` fed by the trainer's own loader (data loading included); the
  time a step waits for its batch is the loader's share.

Rounds are interleaved (every variant once per round, every other round in reverse order); a variant's
time is the median of its timed steps, a ratio the median over rounds of the per-round ratio.

Usage::

    python bench/cpu_bound.py --config configs/experiments/cpu/idc.yaml --shards DATA [--ranks 1 2]
        [--placement ilm_dist torch_default] [--rounds 5] [--steps 8] [--set key=value ...]

Writes ``bench/results/cpu_bound_<device>.json`` (``--out``): device, CPU model and flags, torch version,
commit, command, load average before and after, and per placement and rank count the placement each rank
read back (threads, cores), samples/s per variant, ratios to the bound and the loader's share.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from common import ROOT, cpu_description, device_slug, source_commit, write_result
from moco_baseline import BaselineEncoder
from torch.nn.parallel import DistributedDataParallel

from ilm_dist import distributed as D
from ilm_dist.config import RunConfig, load_config
from ilm_dist.cpu_placement import available_cores, current_placement
from ilm_dist.data import TwoViewBatch
from ilm_dist.train.trainer import Trainer

VARIANTS = ("bound", "ilm_step", "ilm_with_data")
PLACEMENTS = ("ilm_dist", "torch_default")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/experiments/cpu/idc.yaml", help="run config")
    parser.add_argument("--shards", type=Path, required=True, help="packed dataset (data_tools.pack)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="run-config overrides")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2], help="rank counts to measure")
    parser.add_argument("--placement", nargs="+", choices=PLACEMENTS, default=list(PLACEMENTS))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per variant and round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant and round")
    parser.add_argument("--out", type=Path, help="JSON path")
    parser.add_argument("--rank-out", type=Path, help=argparse.SUPPRESS)  # set for the ranks themselves
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # set by deepspeed
    return parser.parse_args()


def run_config(args: argparse.Namespace, placement: str, out: Path) -> RunConfig:
    threads = [f"cpu.threads={len(available_cores())}", "cpu.bind=false"]
    overrides = [
        f"data.shards={args.shards}",
        "data.backend=torch",
        "optim.schedule=constant",
        "train.max_steps=1000000",
        "train.ckpt_every=0",
        "monitor.every=0",
        "val.every=0",
        f"output_dir={out}",
        *args.set,
        *(threads if placement == "torch_default" else []),
    ]
    return load_config(ROOT / args.config, overrides)


# --------------------------------------------------------------------------- the bound


class PlainStep:
    """One plain MoCo step: what the hardware has to do for this shape, without ilm_dist's machinery."""

    def __init__(self, cfg: RunConfig, lr: float, dtype: torch.dtype):
        self.cfg = cfg
        fmt = torch.channels_last if cfg.model.channels_last else torch.contiguous_format
        query = BaselineEncoder(cfg).to(memory_format=fmt)
        self.key = copy.deepcopy(query).requires_grad_(False)
        self.query = DistributedDataParallel(query) if D.world_size() > 1 else query
        self.optimizer = torch.optim.SGD(query.parameters(), lr=lr, momentum=cfg.optim.momentum)
        self.queue = F.normalize(torch.randn(cfg.moco.queue_size, cfg.moco.dim), dim=1)
        self.autocast = dtype == torch.bfloat16

    def block_loss(self, q_blocks: list[torch.Tensor], k_blocks: list[torch.Tensor]) -> torch.Tensor:
        loss = self.cfg.loss
        if loss.type != "mse":
            return torch.zeros(())
        sizes = loss.options["mse"].pool_sizes
        total = torch.zeros(())
        for block, weight, size in zip(loss.blocks, loss.weights, sizes, strict=True):
            q = F.adaptive_avg_pool2d(q_blocks[block - 1], size).flatten(1)
            k = F.adaptive_avg_pool2d(k_blocks[block - 1], size).flatten(1)
            total = total + weight * F.mse_loss(q.float(), k.float())
        return total

    def __call__(self, batch: TwoViewBatch) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast):
            with torch.no_grad():
                for k, q in zip(self.key.parameters(), self.query.parameters(), strict=True):
                    k.lerp_(q, 1 - self.cfg.moco.momentum)
                k_embed, k_blocks = self.key(batch.view2)
                k_embed = F.normalize(k_embed.float(), dim=1)
            q_embed, q_blocks = self.query(batch.view1)
            q_embed = F.normalize(q_embed.float(), dim=1)
            positive = (q_embed * k_embed).sum(1, keepdim=True)
            logits = torch.cat([positive, q_embed @ self.queue.T], 1) / self.cfg.moco.temperature
            loss = F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long))
            loss = loss + self.block_loss(q_blocks, k_blocks)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.queue = torch.cat([k_embed, self.queue[: -len(k_embed)]])


# --------------------------------------------------------------------------- one rank


def in_memory_batches(trainer: Trainer, count: int) -> list[TwoViewBatch]:
    fmt = trainer.cfg.model.channels_last
    batches = []
    for batch in trainer.loader.epoch(0):
        batches.append(batch.to(trainer.device, trainer.dtype, fmt))
        if len(batches) == count:
            return batches
    raise SystemExit(f"{trainer.cfg.data.shards}: fewer than {count} batches per rank in one epoch")


class Timed:
    """Per-step wall times of one variant (and, fed by a loader, the time each step waited for data)."""

    def __init__(self) -> None:
        self.rounds: list[float] = []
        self.steps: list[float] = []
        self.waits: list[float] = []


def timed_steps(step, batches: Iterator[TwoViewBatch], warmup: int, steps: int, timed: Timed) -> None:
    D.barrier()
    walls, waits = [], []
    for i in range(warmup + steps):
        start = time.perf_counter()
        batch = next(batches)
        fetched = time.perf_counter()
        step(batch)
        if i >= warmup:
            walls.append((time.perf_counter() - start) * 1e3)
            waits.append((fetched - start) * 1e3)
    D.barrier()
    timed.rounds.append(statistics.median(walls))
    timed.steps += walls
    timed.waits += waits


def cycle(batches: list[TwoViewBatch]) -> Iterator[TwoViewBatch]:
    while True:
        yield from batches


def rank_main(args: argparse.Namespace, placement: str) -> None:
    cfg = run_config(args, placement, Path(tempfile.mkdtemp(prefix="ilm_dist_cpu_bound_")))
    trainer = Trainer(cfg)  # applies the placement before anything else runs
    bound = PlainStep(cfg, trainer.engine.get_lr()[0], trainer.dtype)
    batches = in_memory_batches(trainer, 4)
    runs = {
        "bound": lambda r: (bound, cycle(batches)),
        "ilm_step": lambda r: (trainer.train_step, cycle(batches)),
        "ilm_with_data": lambda r: (trainer.train_step, iter(trainer.loader.epoch(r + 1))),
    }
    timed = {name: Timed() for name in VARIANTS}
    for r in range(args.rounds):
        for name in VARIANTS if r % 2 == 0 else reversed(VARIANTS):
            step, source = runs[name](r)
            timed_steps(step, source, args.warmup, args.steps, timed[name])
        if trainer.info.is_main:
            print(
                f"round {r + 1}: " + ", ".join(f"{n} {t.rounds[-1]:.0f} ms" for n, t in timed.items()),
                flush=True,
            )
    per_rank = D.all_gather_object(current_placement())
    if trainer.info.is_main:
        args.rank_out.write_text(json.dumps(summarise(timed, cfg, trainer, per_rank)))
    D.shutdown()


def summarise(timed: dict[str, Timed], cfg: RunConfig, trainer: Trainer, per_rank: list) -> dict:
    samples = cfg.data.batch_size * trainer.info.world_size  # two-view samples per step, all ranks
    variants = {
        name: {
            "samples_per_s": round(samples / statistics.median(t.steps) * 1e3, 1),
            "step_ms": round(statistics.median(t.steps), 1),
            "rounds_ms": [round(x, 1) for x in t.rounds],
        }
        for name, t in timed.items()
    }
    data = timed["ilm_with_data"]
    bound = timed["bound"].rounds
    return {
        "placement": trainer.cpu.describe(),
        "placement_read_back_per_rank": per_rank,
        "variants": variants,
        "ratio_to_bound": {
            name: {
                "median": round(statistics.median(b / x for b, x in zip(bound, t.rounds, strict=True)), 3),
                "range": [
                    round(min(b / x for b, x in zip(bound, t.rounds, strict=True)), 3),
                    round(max(b / x for b, x in zip(bound, t.rounds, strict=True)), 3),
                ],
            }
            for name, t in timed.items()
            if name != "bound"
        },
        "loader_wait_share": round(sum(data.waits) / sum(data.steps), 4),
        "loader_wait_ms_median": round(statistics.median(data.waits), 2),
    }


# --------------------------------------------------------------------------- the driver


def launch(args: argparse.Namespace, ranks: int, placement: str, out: Path) -> dict:
    script = [str(Path(__file__).resolve()), *sys.argv[1:], "--rank-out", str(out), "--placement", placement]
    if ranks == 1:
        cmd = [sys.executable, *script]
    else:
        deepspeed = str(Path(sys.executable).with_name("deepspeed"))
        cmd = [deepspeed, "--num_gpus", str(ranks), "--master_port", str(D.free_port()), *script]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}
    env.pop("OMP_NUM_THREADS", None)  # the placement under test decides
    print(f"== {ranks} rank(s), placement {placement}", flush=True)
    subprocess.run(cmd, cwd=ROOT, env=env, check=True)
    return json.loads(out.read_text())


def main() -> None:
    args = parse_args()
    if args.rank_out:  # one rank of a measurement
        rank_main(args, args.placement[0])
        return
    load_before = os.getloadavg()
    results = {}
    with tempfile.TemporaryDirectory(prefix="ilm_dist_cpu_bound_") as tmp:
        for placement in args.placement:
            for ranks in args.ranks:
                key = f"{placement}/{ranks}_ranks"
                results[key] = launch(args, ranks, placement, Path(tmp) / f"{placement}_{ranks}.json")
                ratio = results[key]["ratio_to_bound"]
                print(
                    f"{key}: {results[key]['placement']}; "
                    + ", ".join(
                        f"{n} {v['samples_per_s']} samples/s" for n, v in results[key]["variants"].items()
                    )
                    + f"; ilm_with_data/bound {ratio['ilm_with_data']['median']}, "
                    f"loader wait {results[key]['loader_wait_share']:.1%}",
                    flush=True,
                )
    record = {
        "device": device_slug(torch.device("cpu")),
        "cpu": cpu_description(),
        "torch": torch.__version__,
        "commit": source_commit("bench/cpu_bound.py", "ilm_dist"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "load_avg": {"before": load_before, "after": os.getloadavg()},
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if v is not None},
        "results": results,
    }
    write_result(record, args.out or ROOT / "bench" / "results" / f"cpu_bound_{record['device']}.json")


if __name__ == "__main__":
    main()
