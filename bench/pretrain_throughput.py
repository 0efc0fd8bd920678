"""End-to-end pretraining throughput: "the usual way" vs ilm_dist's training path vs its synthetic-data bound.

Variants, run one after the other in one process on the same packed shards, for each ``--losses`` type
(MoCo v2 + Barlow Twins or MSE on blocks 1-4; the losses' weights are those of configs/*/moco_{bt,mse}.yaml):

- ``baseline``, implemented here as the official code / facebookresearch/moco / solo-learn do it without
  DALI: a plain Dataset over the shards (PIL decode, torchvision v2 MoCo v2 views) in a DataLoader with one
  worker per core; a torchvision ResNet run block by block; fp32 weights under ``torch.autocast`` (fp16 with
  a GradScaler on CUDA, bf16 on CPU); the per-layer Barlow Twins loss of the official code
  (``bench/xcorr.py:official_loss``: per-block projector, BatchNorm1d(affine=False), D x D matmul,
  diagonal / off-diagonal) or the pooled MSE; a per-parameter Python loop for the momentum update; the
  official queue (its pointer read back with ``int()``); plain ``torch.optim.SGD``; ``cudnn.benchmark`` as
  in the official code; one process, no DDP.
- ``ilm_dist``: ``ilm_dist.train.trainer.Trainer.train_step`` built from a RunConfig: DALI (nvJPEG decode,
  GPU augmentations) on CUDA, the torch backend on CPU (no GPU to decode on); DeepSpeed with
  ``--ds-config`` (bf16 autocast ZeRO-1 on CUDA; fp32 on CPU, where bf16 convolutions are emulated unless the
  CPU has AVX-512 BF16 or AMX); the csrc op (``loss.bt.impl=ext`` when built); the
  fused fp32 EMA; channels-last inputs (``--channels-last``).
- ``synthetic``: the same step on ``data.backend=synthetic`` (batches already on the device): the bound.

Both sides use the same RunConfig (``--config`` plus the overrides above and ``--set``), with a constant
learning rate. Per variant: two-view samples/s (batch / median wall time of ``--steps`` steps after
``--warmup``, data wait included), the median milliseconds per phase (``ilm_dist.train.timing.StepTimer``:
CUDA events on the GPU, no sync inside a step), peak memory and model FLOP utilisation (MFU: the FLOPs of
one query forward + backward, key forward and loss of the baseline's reference formulation, counted with
``torch.utils.flop_counter.FlopCounterMode``, over ``--peak-tflops`` or the bf16 dense peak of an H100/H200).

``--curve-steps N`` also trains the baseline and ilm_dist from the same initial weights and queue on the
same N batches, the baseline in ilm_dist's precision (bf16 autocast against DeepSpeed bf16; fp32 against
fp32, where the curves agree to rounding), and reports the mean absolute difference of each loss term
relative to its mean magnitude, next to the noise reference: the same difference between the baseline and
the baseline from seed + 1 (other initial weights, queue, batch order and augmentations).

Usage (GPU: ResNet-50, 224 px, batch 256 halved on OOM; CPU: give small sizes)::

    python bench/pretrain_throughput.py [--shards DIR] [--losses bt mse] [--curve-steps 200]
    python bench/pretrain_throughput.py --arch resnet18 --size 64 --batch 8 --steps 3 --warmup 1 --threads 1

Writes ``bench/results/pretrain_throughput_<device>.json``: top-level ``device``, ``commit``, ``command``,
``settings``, ``notes``, ``variants`` (``baseline`` / ``ilm_dist`` / ``synthetic`` -> ``description``,
``precision`` and ``by_loss`` -> loss type -> ``samples_per_s``, ``step_ms``, ``phases_ms``,
``unattributed_ms``, ``peak_mem_bytes``, ``mfu``, ``runs_ms``), ``model_flops_per_step``, ``ratios``,
``goals`` and ``loss_curve``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from common import ROOT, device_slug, source_commit, write_result
from data_pipeline import pack_synthetic
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from torch.utils.flop_counter import FlopCounterMode
from xcorr import official_loss

from ilm_dist.config import RunConfig, load_config
from ilm_dist.data import PretrainLoader, TwoViewBatch, build_pretrain_loader
from ilm_dist.data.augment import moco_view_transform
from ilm_dist.data.manifest import load_manifest
from ilm_dist.data.shard_reader import ShardReader
from ilm_dist.losses.barlow_twins import bt_projector
from ilm_dist.model.encoder import block_channels, build_resnet, projection_head
from ilm_dist.ops import extension_available
from ilm_dist.train.optim import scaled_lr
from ilm_dist.train.timing import StepTimer
from ilm_dist.train.trainer import Trainer

VARIANTS = ("baseline", "ilm_dist", "synthetic")
PHASES = ("data", "to_device", "ema", "key_forward", "forward", "loss", "backward", "optimizer", "queue")
LOSSES = {  # Kaku et al. 2021, official code (configs/*/moco_bt.yaml, configs/*/moco_mse.yaml)
    "bt": ["loss.type=bt", "loss.weights=[5.0e-5, 5.0e-5, 5.0e-5, 5.0e-5]", "loss.bt.scale=0.03125"],
    "mse": ["loss.type=mse", "loss.weights=[0.25, 0.25, 0.25, 0.25]"],
}
MSE_POOL, BLOCK_STRIDES = (16, 16, 4, 4), (4, 8, 16, 32)
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0}  # bf16/fp16 dense tensor-core peak
GOALS = {"ilm_dist/baseline": 3.0, "ilm_dist/synthetic": 0.9, "ilm_dist_samples_per_s": 3000.0}
NOTES = {
    "samples_per_s": "two-view samples per second: batch / median wall time of a step (data wait included)",
    "phases_ms": "median ms per phase over the timed steps; CPU: perf_counter at phase boundaries; CUDA: "
    "events at the boundaries and one synchronize per step (GPU-timeline time between them); "
    "unattributed_ms: the step's wall time outside every phase (loop glue, loss bookkeeping)",
    "flops": "model_flops_per_step: one query forward + backward, key forward and loss of the baseline's "
    "reference formulation (FlopCounterMode: matmuls and convolutions), the same for every variant "
    "(the csrc op may do fewer: it takes ||C||_F^2 from N x N Gram matrices when N < D); optimizer and "
    "EMA excluded. mfu = model_flops_per_step * steps/s / peak",
}
PEAK_MEMORY_NOTES = {
    "cuda": "torch.cuda.max_memory_allocated over warm-up and timed steps (reset per variant)",
    "cpu": "peak resident set size of the benchmark process over warm-up and timed steps (VmHWM, reset "
    "per variant through /proc/self/clear_refs): includes Python, libraries and anything not yet freed, "
    "excludes the DataLoader worker processes; null where it cannot be reset",
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=Path, help="packed dataset (default: pack a synthetic one)")
    parser.add_argument("--split", default="train")
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--size", type=int, default=224, help="view side")
    parser.add_argument("--source-size", type=int, default=256, help="side of the synthetic images")
    parser.add_argument("--batch", default="auto", help="per-GPU batch; auto: 256 halved on OOM (CPU: 8)")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=10, help="steps run before timing")
    parser.add_argument("--losses", nargs="+", choices=sorted(LOSSES), default=["bt", "mse"])
    parser.add_argument("--curve-steps", type=int, default=0, help="loss-curve check length (0: off)")
    parser.add_argument("--curve-tol", type=float, default=0.02, help="relative difference for a match")
    parser.add_argument("--peak-tflops", type=float, help="peak FLOP/s for MFU (default: H100/H200 table)")
    parser.add_argument("--config", default="configs/presets/mocov2.yaml", help="base RunConfig")
    parser.add_argument("--ds-config", help="DeepSpeed JSON (default: bf16_zero1 on CUDA, fp32 on CPU)")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="RunConfig overrides")
    parser.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="JSON path")
    return parser.parse_args()


# --------------------------------------------------------------------------- configuration


def bench_config(args: argparse.Namespace, loss: str, backend: str, batch: int, out: Path) -> RunConfig:
    """The RunConfig both the baseline and ilm_dist train with."""
    pools = [min(p, max(1, args.size // s)) for p, s in zip(MSE_POOL, BLOCK_STRIDES, strict=True)]
    overrides = [
        *LOSSES[loss],
        f"loss.mse.pool_sizes={pools}",
        f"loss.bt.impl={'ext' if extension_available() else 'torch'}",
        f"model.arch={args.arch}",
        f"data.backend={backend}",
        f"data.shards={args.shards}",
        f"data.split={args.split}",
        f"data.image_size={args.size}",
        f"data.batch_size={batch}",
        f"data.num_workers={os.cpu_count()}",
        f"data.synthetic.num_samples={batch * (args.warmup + args.steps)}",
        f"engine.deepspeed_config={args.ds_config}",
        "optim.schedule=constant",
        "optim.warmup_steps=0",
        f"train.max_steps={args.warmup + args.steps + args.curve_steps}",
        f"seed={args.seed}",
        f"output_dir={out}",
        *args.set,
    ]
    return load_config(ROOT / args.config, overrides)


def batch_candidates(batch: str, device: torch.device) -> list[int]:
    if batch != "auto":
        return [int(batch)]
    return [256 >> i for i in range(8)] if device.type == "cuda" else [8]


# --------------------------------------------------------------------------- baseline


class ViewPairs(Dataset):
    """A plain map-style dataset over the packed shards: PIL decode, two torchvision MoCo v2 views."""

    def __init__(self, cfg: RunConfig):
        self.reader = ShardReader(load_manifest(cfg.data.shards), cfg.data.split)
        self.transform = moco_view_transform(cfg.aug, cfg.data.image_size)

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image = self.reader.image(index)
        return self.transform(image), self.transform(image)


def baseline_batches(cfg: RunConfig, device: torch.device) -> Iterator[list[Tensor]]:
    """Endless shuffled batches from a DataLoader with one worker per core (as the official code)."""
    loader = DataLoader(
        ViewPairs(cfg),
        batch_size=cfg.data.batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=os.cpu_count() or 1,
        pin_memory=device.type == "cuda",
        persistent_workers=True,
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    while True:
        yield from loader


class BaselineEncoder(nn.Module):
    """A torchvision ResNet run block by block (returning the block outputs) and the MoCo head."""

    def __init__(self, cfg: RunConfig):
        super().__init__()
        self.backbone = build_resnet(cfg.model.arch, cfg.model.zero_init_residual)
        self.head = projection_head(self.backbone.fc.in_features, cfg.moco.dim, cfg.moco.mlp)
        self.backbone.fc = nn.Identity()

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        r = self.backbone
        x = r.maxpool(r.relu(r.bn1(r.conv1(x))))
        blocks = []
        for layer in (r.layer1, r.layer2, r.layer3, r.layer4):
            x = layer(x)
            blocks.append(x)
        return self.head(torch.flatten(r.avgpool(x), 1)), blocks


class Baseline:
    """MoCo v2 + an intermediate-layer loss trained the usual way (see the module docstring)."""

    def __init__(self, cfg: RunConfig, device: torch.device, dtype: torch.dtype):
        self.cfg, self.device, self.dtype = cfg, device, dtype
        self.loss, self.blocks = cfg.loss, cfg.loss.blocks
        self.model = nn.ModuleDict({"encoder": BaselineEncoder(cfg)})
        if self.loss.type == "bt":
            channels = block_channels(self.model.encoder.backbone)
            dims = self.loss.bt.proj_dims
            self.model["projectors"] = nn.ModuleList(bt_projector(channels[b - 1], dims) for b in self.blocks)
        self.model.to(device)
        self.key_encoder = copy.deepcopy(self.model.encoder).requires_grad_(False)
        self.queue = F.normalize(torch.randn(cfg.moco.dim, cfg.moco.queue_size, device=device), dim=0)
        self.queue_ptr = torch.zeros(1, dtype=torch.long, device=device)
        self.weights = torch.tensor(self.loss.weights, device=device)
        lr = scaled_lr(cfg.optim, cfg.data.batch_size)
        self.optimizer = torch.optim.SGD(
            self.model.parameters(), lr=lr, momentum=cfg.optim.momentum, weight_decay=cfg.optim.weight_decay
        )
        self.scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
        self.timer = StepTimer()

    def autocast(self) -> AbstractContextManager[None]:
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    def load_from(self, trainer: Trainer) -> None:
        """Start from ilm_dist's state: the engine's weights, its key encoder and its queue."""
        state = trainer.engine.module.state_dict()
        self.model.load_state_dict({k.replace("intermediate.", "", 1): v for k, v in state.items()})
        self.key_encoder.load_state_dict(trainer.key_encoder.encoder.state_dict())
        self.queue.copy_(trainer.queue.keys.T)

    @torch.no_grad()
    def momentum_update(self) -> None:
        m = self.cfg.moco.momentum
        for param_q, param_k in zip(
            self.model.encoder.parameters(), self.key_encoder.parameters(), strict=True
        ):
            param_k.data = param_k.data * m + param_q.data * (1.0 - m)

    def reduce(self, blocks: list[Tensor]) -> list[Tensor]:
        if self.loss.type == "bt":
            return [F.adaptive_avg_pool2d(blocks[b - 1], 1).flatten(1) for b in self.blocks]
        sizes = self.loss.mse.pool_sizes
        return [F.adaptive_avg_pool2d(blocks[b - 1], sizes[b - 1]) for b in self.blocks]

    @torch.no_grad()
    def keys(self, view2: Tensor) -> list[Tensor]:
        with self.autocast():
            embedding, blocks = self.key_encoder(view2)
            return [F.normalize(embedding, dim=1), *self.reduce(blocks)]

    def terms(self, view1: Tensor, keys: list[Tensor]) -> dict[str, Tensor]:
        with self.timer.phase("forward"), self.autocast():
            embedding, blocks = self.model.encoder(view1)
        with self.timer.phase("loss"), self.autocast():
            q = F.normalize(embedding, dim=1)
            l_pos = torch.einsum("nc,nc->n", q, keys[0]).unsqueeze(-1)
            l_neg = torch.einsum("nc,ck->nk", q, self.queue.clone().detach())
            logits = torch.cat([l_pos, l_neg], dim=1) / self.cfg.moco.temperature
            moco = F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=self.device))
            per_block = self.intermediate(self.reduce(blocks), keys[1:])
        names = [f"{self.loss.type}_block{b}" for b in self.blocks]
        return {"loss": moco + per_block.sum(), "moco": moco, **dict(zip(names, per_block, strict=True))}

    def intermediate(self, q_reduced: list[Tensor], k_reduced: list[Tensor]) -> Tensor:
        if self.loss.type == "mse":
            losses = [F.mse_loss(q, k) for q, k in zip(q_reduced, k_reduced, strict=True)]
            return self.weights * torch.stack(losses)
        projectors, bt = self.model.projectors, self.loss.bt
        z1 = torch.stack([proj(q) for proj, q in zip(projectors, q_reduced, strict=True)])
        z2 = torch.stack([proj(k) for proj, k in zip(projectors, k_reduced, strict=True)])
        on_weight = self.weights * bt.scale
        return official_loss(z1, z2, on_weight, on_weight * bt.off_diag_weight)

    @torch.no_grad()
    def enqueue(self, keys: Tensor) -> None:
        ptr = int(self.queue_ptr)  # the official code's host read of the pointer (a sync on CUDA)
        assert self.queue.shape[1] % len(keys) == 0, "the official queue needs K % batch == 0"
        self.queue[:, ptr : ptr + len(keys)] = keys.T
        self.queue_ptr[0] = (ptr + len(keys)) % self.queue.shape[1]

    def step(self, batch: list[Tensor]) -> dict[str, Tensor]:
        phase = self.timer.phase
        with phase("to_device"):
            view1, view2 = (v.to(self.device, non_blocking=True) for v in batch)
        with phase("ema"):
            self.momentum_update()
        with phase("key_forward"):
            keys = self.keys(view2)
        terms = self.terms(view1, keys)
        with phase("backward"):
            self.optimizer.zero_grad()
            self.scaler.scale(terms["loss"]).backward()
        with phase("optimizer"):
            self.scaler.step(self.optimizer)
            self.scaler.update()
        with phase("queue"):
            self.enqueue(keys[0])
        return terms

    def model_flops(self, batch: list[Tensor]) -> int:
        """FLOPs of one query forward + backward, key forward and loss (no optimizer step)."""
        view1, view2 = (v.to(self.device) for v in batch)
        with FlopCounterMode(display=False) as counter:
            self.terms(view1, self.keys(view2))["loss"].backward()
        self.optimizer.zero_grad()
        return counter.get_total_flops()


def baseline_dtype(device: torch.device) -> torch.dtype:
    return torch.float16 if device.type == "cuda" else torch.bfloat16


def baseline_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32:
        return "fp32, no autocast"
    scaler = " + GradScaler" if dtype == torch.float16 else ""
    return f"fp32 weights, torch.autocast {str(dtype).removeprefix('torch.')}{scaler}"


# --------------------------------------------------------------------------- ilm_dist


def build_trainer(cfg: RunConfig, channels_last: bool) -> Trainer:
    trainer = Trainer(cfg)
    if channels_last:
        use_channels_last(trainer)
    return trainer


def use_channels_last(trainer: Trainer) -> None:
    """Channels-last inputs, key encoder and loader layout on a Trainer built without them.

    ``model.channels_last=true`` makes ``deepspeed.initialize`` fail (its parameter broadcast views every
    weight as bytes, which needs a unit last stride), and ZeRO's flat buffers keep the engine's weights
    contiguous anyway; cuDNN and oneDNN run a convolution channels-last when its input is.
    """
    trainer.cfg.model.channels_last = True
    trainer.key_encoder.to(memory_format=torch.channels_last)
    info = trainer.info
    trainer.loader = build_pretrain_loader(trainer.cfg, info.rank, info.world_size, trainer.device)


def endless(loader: PretrainLoader) -> Iterator[TwoViewBatch]:
    epoch = 0
    while True:
        yield from loader.epoch(epoch)
        epoch += 1


# --------------------------------------------------------------------------- measurement


class PeakMemory:
    """Peak bytes over a region, as ``PEAK_MEMORY_NOTES`` describes; ``read`` gives None if unavailable."""

    def __init__(self, device: torch.device):
        self.device, self.reset_ok = device, False

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.reset_ok = True
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.reset_ok = True
        except OSError:
            self.reset_ok = False

    def read(self) -> int | None:
        if not self.reset_ok:
            return None
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        return None


def measure(
    step: Callable[[Any], object], batches: Iterator, timer: StepTimer, args: argparse.Namespace, batch: int
) -> dict:
    """Run warm-up and timed steps; samples/s from the median step, medians of the phase times."""
    peak = PeakMemory(timer.device)
    peak.reset()
    records = []
    for i in range(args.warmup + args.steps):
        start = time.perf_counter()
        with timer.phase("data"):
            item = next(batches)
        step(item)
        phases = timer.finish_step()
        if i >= args.warmup:
            records.append(((time.perf_counter() - start) * 1e3, phases))
    step_ms = statistics.median(total for total, _ in records)
    return {
        "samples_per_s": round(batch / step_ms * 1e3, 2),
        "step_ms": round(step_ms, 3),
        "phases_ms": {
            name: round(statistics.median(p.get(name, 0.0) for _, p in records), 3)
            for name in PHASES
            if any(name in p for _, p in records)
        },
        "unattributed_ms": round(statistics.median(t - sum(p.values()) for t, p in records), 3),
        "peak_mem_bytes": peak.read(),
        "runs_ms": [round(total, 3) for total, _ in records],
    }


@contextmanager
def cudnn_benchmark(enabled: bool) -> Iterator[None]:
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_baseline(args: argparse.Namespace, cfg: RunConfig, device: torch.device) -> tuple[dict, dict]:
    dtype = baseline_dtype(device)
    baseline, batches = Baseline(cfg, device, dtype), baseline_batches(cfg, device)
    with cudnn_benchmark(True):  # the official code sets it
        flops = baseline.model_flops(next(batches))
        baseline.timer = StepTimer(device, enabled=True)
        result = measure(baseline.step, batches, baseline.timer, args, cfg.data.batch_size)
    info = {
        "description": f"DataLoader ({os.cpu_count()} workers, PIL + torchvision v2), per-layer reference "
        "loss, Python EMA loop, torch.optim.SGD",
        "precision": baseline_precision(dtype),
    }
    return result | {"model_flops_per_step": flops}, info


def run_ilm_dist(args: argparse.Namespace, cfg: RunConfig, device: torch.device) -> tuple[dict, dict]:
    trainer = build_trainer(cfg, args.channels_last)
    timer = trainer.timer = StepTimer(device, enabled=True)
    hook = timer.split_after(trainer.engine.module.encoder, "loss")  # the loss after the query encoder
    result = measure(trainer.train_step, endless(trainer.loader), timer, args, cfg.data.batch_size)
    hook.remove()
    info = {
        "description": f"{trainer.loader.description}; loss.bt.impl={cfg.loss.bt.impl}, fused EMA, "
        f"channels-last {'on' if args.channels_last else 'off'}",
        "precision": f"DeepSpeed {args.ds_config} ({str(trainer.dtype).removeprefix('torch.')} compute, fp32 weights)",
    }
    return result, info


def run_losses(args: argparse.Namespace, device: torch.device, batch: int, tmp: Path) -> tuple[dict, dict]:
    """Every variant for every loss: (variants, model FLOPs per step by loss)."""
    runners = {"baseline": run_baseline, "ilm_dist": run_ilm_dist, "synthetic": run_ilm_dist}
    backend = "dali" if device.type == "cuda" else "torch"
    variants: dict[str, dict] = {name: {"by_loss": {}} for name in VARIANTS}
    flops: dict[str, int] = {}
    for loss in args.losses:
        for name, runner in runners.items():
            data = "synthetic" if name == "synthetic" else backend
            result, info = runner(args, bench_config(args, loss, data, batch, tmp / f"{name}_{loss}"), device)
            release(device)
            if name == "baseline":
                flops[loss] = result.pop("model_flops_per_step")
            variants[name] |= info
            variants[name]["by_loss"][loss] = result
            print(f"{loss:4s} {name:9s} {result['samples_per_s']:9.2f} two-view samples/s", flush=True)
    return variants, flops


# --------------------------------------------------------------------------- loss curves


def loss_curves(args: argparse.Namespace, device: torch.device, batch: int, tmp: Path) -> dict[str, dict]:
    """Baseline and ilm_dist from the same state on the same batches: per-term relative differences."""
    return {
        loss: loss_curve(args, bench_config(args, loss, "torch", batch, tmp / f"curve_{loss}"), device)
        for loss in args.losses
    }


def loss_curve(args: argparse.Namespace, cfg: RunConfig, device: torch.device) -> dict:
    curves, precision, dtype = side_by_side(args, cfg, device)
    release(device)
    curves["baseline_other_seed"] = other_seed_curve(args, cfg, device, dtype)
    release(device)
    terms = {term: compare(values, curves["ilm_dist"][term]) for term, values in curves["baseline"].items()}
    noise = {
        term: compare(values, curves["baseline_other_seed"][term])
        for term, values in curves["baseline"].items()
    }
    return {
        "steps": args.curve_steps,
        "precision": precision,
        "relative": terms["loss"]["relative"],
        "match": terms["loss"]["relative"] <= args.curve_tol,
        "tolerance": args.curve_tol,
        "terms": terms,
        "noise": noise,
        "noise_definition": "the same comparison between the baseline and the baseline run again with seed + 1 "
        "(other initial weights and queue, other batch order and augmentations)",
        "within_noise": all(terms[t]["mean_abs_diff"] <= noise[t]["mean_abs_diff"] for t in terms),
        "loss": {name: [round(v, 5) for v in curve["loss"]] for name, curve in curves.items()},
    }


def side_by_side(
    args: argparse.Namespace, cfg: RunConfig, device: torch.device
) -> tuple[dict[str, dict[str, list[float]]], str, torch.dtype]:
    """Per-step loss terms of the baseline (in ilm_dist's precision) and ilm_dist on the same batches."""
    trainer = build_trainer(cfg, args.channels_last)
    baseline = Baseline(cfg, device, trainer.dtype)
    baseline.load_from(trainer)
    batches = baseline_batches(cfg, device)
    curves: dict[str, dict[str, list[float]]] = {"baseline": {}, "ilm_dist": {}}
    for _ in range(args.curve_steps):
        view1, view2 = next(batches)
        index = torch.arange(len(view1))
        runs = {
            "baseline": baseline.step([view1, view2]),
            "ilm_dist": trainer.train_step(TwoViewBatch(view1, view2, torch.zeros_like(index), index)),
        }
        for name, terms in runs.items():
            for term, value in terms.items():
                curves[name].setdefault(term, []).append(float(value.detach()))
    return curves, baseline_precision(trainer.dtype), trainer.dtype


def other_seed_curve(
    args: argparse.Namespace, cfg: RunConfig, device: torch.device, dtype: torch.dtype
) -> dict[str, list[float]]:
    """The noise reference: the baseline's loss terms from seed + 1, an equally valid run of the same method."""
    other = dataclasses.replace(cfg, seed=cfg.seed + 1)
    torch.manual_seed(other.seed)
    baseline, batches = Baseline(other, device, dtype), baseline_batches(other, device)
    curve: dict[str, list[float]] = {}
    for _ in range(args.curve_steps):
        for term, value in baseline.step(next(batches)).items():
            curve.setdefault(term, []).append(float(value.detach()))
    return curve


def compare(reference: list[float], other: list[float]) -> dict[str, float]:
    mad = statistics.fmean(abs(a - b) for a, b in zip(reference, other, strict=True))
    scale = statistics.fmean(abs(a) for a in reference)
    return {"mean_abs_diff": mad, "scale": scale, "relative": mad / scale if scale else float("nan")}


# --------------------------------------------------------------------------- report


def peak_tflops(args: argparse.Namespace, device: torch.device) -> float | None:
    if args.peak_tflops or device.type != "cuda":
        return args.peak_tflops
    name = torch.cuda.get_device_name(device)
    return next((tflops for key, tflops in PEAK_TFLOPS.items() if key in name), None)


def add_mfu(variants: dict, flops: dict[str, int], batch: int, peak: float | None) -> None:
    for variant in variants.values():
        for loss, result in variant["by_loss"].items():
            rate = flops[loss] * result["samples_per_s"] / batch
            result["mfu"] = round(rate / (peak * 1e12), 4) if peak else None


def ratios(variants: dict) -> dict[str, dict[str, float]]:
    rate = {name: v["by_loss"] for name, v in variants.items()}
    return {
        loss: {
            f"ilm_dist/{other}": round(
                rate["ilm_dist"][loss]["samples_per_s"] / rate[other][loss]["samples_per_s"], 3
            )
            for other in ("baseline", "synthetic")
        }
        for loss in rate["ilm_dist"]
    }


def goals(args: argparse.Namespace, device: torch.device, result: dict) -> dict:
    """The issue's targets (MoCo + BT, ResNet-50, 224 px, bf16, one H100) against this run."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    setup = args.arch == "resnet50" and args.size == 224 and "bf16" in args.ds_config
    if not ("H100" in name and setup and "bt" in result["ratios"]):
        return {"applies": False, "note": "targets are for MoCo + BT, ResNet-50, 224 px, bf16 on one H100"}
    measured = result["ratios"]["bt"] | {
        "ilm_dist_samples_per_s": result["variants"]["ilm_dist"]["by_loss"]["bt"]["samples_per_s"]
    }
    out = {"applies": True} | {
        key: {"target": target, "measured": measured[key], "met": measured[key] >= target}
        for key, target in GOALS.items()
    }
    curve = (result["loss_curve"] or {}).get("bt")
    if curve:
        met = curve["match"] and curve["steps"] >= 200
        out["loss_curve"] = {
            "target": "match over >= 200 steps",
            "measured": curve["relative"],
            "within_noise": curve["within_noise"],
            "met": met,
        }
    return out


def sources_dirty() -> bool:
    paths = ["ilm_dist", "csrc", "bench/pretrain_throughput.py", "configs"]
    status = subprocess.run(
        ["git", "-C", str(ROOT), "status", "--porcelain", "--", *paths], capture_output=True, text=True
    )
    return bool(status.stdout.strip())


def print_table(variants: dict) -> None:
    cols = [
        p
        for p in PHASES
        if any(p in r["phases_ms"] for v in variants.values() for r in v["by_loss"].values())
    ]
    print(
        f"{'loss':4s} {'variant':9s} {'samples/s':>9s} {'step ms':>8s} "
        + " ".join(f"{c[:8]:>8s}" for c in cols)
    )
    for name, variant in variants.items():
        for loss, r in variant["by_loss"].items():
            phases = " ".join(f"{r['phases_ms'].get(c, 0.0):8.1f}" for c in cols)
            print(f"{loss:4s} {name:9s} {r['samples_per_s']:9.2f} {r['step_ms']:8.1f} {phases}")


def run(args: argparse.Namespace, device: torch.device, tmp: Path) -> dict:
    """Every variant at the largest batch that fits, then the loss curves."""
    candidates = batch_candidates(args.batch, device)
    args.shards = args.shards or pack_synthetic(
        tmp / "synthetic", candidates[0] * (args.warmup + args.steps + 4), args.source_size
    )
    for batch in candidates:
        try:
            variants, flops = run_losses(args, device, batch, tmp)
            break
        except torch.OutOfMemoryError:
            print(f"batch {batch}: out of memory, halving", flush=True)
        release(device)
    else:
        sys.exit("out of memory at every batch size")
    add_mfu(variants, flops, batch, peak_tflops(args, device))
    return {
        "batch": batch,
        "batch_tried": candidates[: candidates.index(batch) + 1],
        "variants": variants,
        "model_flops_per_step": flops,
        "ratios": ratios(variants),
        "loss_curve": loss_curves(args, device, batch, tmp) if args.curve_steps else None,
    }


def settings(args: argparse.Namespace, device: torch.device, shards: Path | None) -> dict:
    return {
        "arch": args.arch,
        "size": args.size,
        "steps": args.steps,
        "warmup": args.warmup,
        "losses": args.losses,
        "config": args.config,
        "overrides": args.set,
        "ds_config": args.ds_config,
        "channels_last": args.channels_last,
        "peak_tflops": peak_tflops(args, device),
        "shards": str(shards) if shards else f"data_tools.synthetic_dataset at {args.source_size} px",
    }


def print_summary(result: dict) -> None:
    print_table(result["variants"])
    for loss, pair in result["ratios"].items():
        print(f"{loss}: " + ", ".join(f"{k} {v}x" for k, v in pair.items()))
    for loss, c in (result["loss_curve"] or {}).items():
        print(
            f"{loss}: loss curve over {c['steps']} steps differs by {c['relative']:.2%} of its scale; "
            f"seed-to-seed noise {c['noise']['loss']['relative']:.2%}; within noise: {c['within_noise']}"
        )


def main() -> None:
    args = parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.ds_config = args.ds_config or (
        "configs/deepspeed/bf16_zero1.json" if device.type == "cuda" else "configs/deepspeed/fp32.json"
    )
    load_before = os.getloadavg()  # other work on the machine skews the numbers
    shards = args.shards
    with tempfile.TemporaryDirectory(prefix="ilm_dist_bench_") as tmp:
        measured = run(args, device, Path(tmp))
    result = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)",
        "commit": source_commit(),
        "uncommitted_changes": sources_dirty(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "torch": torch.__version__,
        "load_average_before": [round(load, 2) for load in load_before],
        "settings": settings(args, device, shards) | {k: measured.pop(k) for k in ("batch", "batch_tried")},
        "notes": NOTES | {"peak_memory": PEAK_MEMORY_NOTES[device.type]},
        **measured,
    }
    result["goals"] = goals(args, device, result)
    print_summary(result)
    out = args.out or ROOT / "bench" / "results" / f"pretrain_throughput_{device_slug(device)}.json"
    write_result(result, out)


if __name__ == "__main__":
    main()
