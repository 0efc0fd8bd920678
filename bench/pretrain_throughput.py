"""End-to-end pretraining throughput: "the usual way" vs ilm_dist's training path vs its synthetic-data bound.

Variants, run one after the other in one process on the same packed shards, for each ``--losses`` type
(MoCo v2 + Barlow Twins or MSE on blocks 1-4; the losses' weights are those of configs/*/moco_{bt,mse}.yaml):

- ``baseline``: bench/moco_baseline.py, MoCo v2 + the loss as the official code / facebookresearch/moco /
  solo-learn train it without DALI (DataLoader with one worker per core, torchvision ResNet block by block,
  torch.autocast, the official per-layer loss, Python EMA loop, torch.optim.SGD, ``cudnn.benchmark`` on).
- ``ilm_dist``: ``ilm_dist.train.trainer.Trainer.train_step`` built from a RunConfig: DALI (nvJPEG decode,
  GPU augmentations) on CUDA, the torch backend on CPU (no GPU to decode on); DeepSpeed with
  ``--ds-config`` (bf16 autocast ZeRO-1 on CUDA; fp32 on CPU, where bf16 convolutions are emulated unless the
  CPU has AVX-512 BF16 or AMX); the csrc op (``loss.bt.impl=ext`` when built); the fused fp32 EMA;
  ``model.channels_last`` (``--channels-last``, on by default), which the Trainer applies to the inputs,
  the loader's layout and the key encoder.
- ``synthetic``: the same step on ``data.backend=synthetic`` (batches already on the device): the bound.

Both sides use the same RunConfig (``--config`` plus the overrides above and ``--set``), with a constant
learning rate. Per variant: two-view samples/s (batch / median wall time of ``--steps`` steps after
``--warmup``, data wait included), the median milliseconds per phase (``ilm_dist.train.timing.StepTimer``,
passed to the Trainer: CUDA events on the GPU, no sync inside a step), peak memory and model FLOP
utilisation (MFU: the FLOPs of one query forward + backward, key forward and loss of the baseline's
reference formulation, counted with ``torch.utils.flop_counter.FlopCounterMode``, over ``--peak-tflops`` or
the bf16 dense peak of an H100/H200).

``--curve-steps N`` also runs the loss-curve parity check of bench/loss_parity.py over N steps.

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
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from common import ROOT, device_slug, release, source_commit, write_result
from data_pipeline import pack_synthetic
from loss_parity import loss_curve
from moco_baseline import Baseline, baseline_batches, baseline_dtype, baseline_precision

from ilm_dist.config import RunConfig, load_config
from ilm_dist.data import PretrainLoader, TwoViewBatch
from ilm_dist.ops import extension_available
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
# Issue #17's goals for MoCo + BT, ResNet-50, 224 px, bf16 on one H100/H200: MLPerf Training v3.0's ResNet-50
# runs at about 7,000 images/s per H100, and an asymmetric MoCo step costs about 4/3 of a supervised one.
GOALS = {"ilm_dist/baseline": 3.0, "ilm_dist/synthetic": 0.9, "ilm_dist_samples_per_s": 4500.0}
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
        f"model.channels_last={str(args.channels_last).lower()}",
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


# --------------------------------------------------------------------------- ilm_dist


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


def run_baseline(args: argparse.Namespace, cfg: RunConfig, device: torch.device) -> tuple[dict, dict]:
    dtype, timer = baseline_dtype(device), StepTimer(device, enabled=True)
    baseline, batches = Baseline(cfg, device, dtype, timer), baseline_batches(cfg, device)
    with cudnn_benchmark(True):  # the official code sets it
        flops = baseline.model_flops(next(batches))
        result = measure(baseline.step, batches, timer, args, cfg.data.batch_size)
    info = {
        "description": f"DataLoader ({os.cpu_count()} workers, PIL + torchvision v2), per-layer reference "
        "loss, Python EMA loop, torch.optim.SGD",
        "precision": baseline_precision(dtype),
    }
    return result | {"model_flops_per_step": flops}, info


def run_ilm_dist(args: argparse.Namespace, cfg: RunConfig, device: torch.device) -> tuple[dict, dict]:
    timer = StepTimer(device, enabled=True)
    trainer = Trainer(cfg, timer=timer)
    hook = timer.split_after(trainer.engine.module.encoder, "loss")  # the loss after the query encoder
    result = measure(trainer.train_step, endless(trainer.loader), timer, args, cfg.data.batch_size)
    hook.remove()
    info = {
        "description": f"{trainer.loader.description}; loss.bt.impl={cfg.loss.bt.impl}, fused EMA, "
        f"channels-last {'on' if cfg.model.channels_last else 'off'}",
        "precision": f"DeepSpeed {args.ds_config} ({str(trainer.dtype).removeprefix('torch.')} weights)",
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
    """Baseline and ilm_dist from the same state on the same batches (bench/loss_parity.py), per loss."""
    return {
        loss: loss_curve(
            bench_config(args, loss, "torch", batch, tmp / f"curve_{loss}"),
            device,
            args.curve_steps,
            args.curve_tol,
        )
        for loss in args.losses
    }


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
    """The GOALS (MoCo + BT, ResNet-50, 224 px, bf16, one H100 or H200) against this run."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    setup = args.arch == "resnet50" and args.size == 224 and "bf16" in args.ds_config
    if not (any(gpu in name for gpu in PEAK_TFLOPS) and setup and "bt" in result["ratios"]):
        return {
            "applies": False,
            "note": "targets are for MoCo + BT, ResNet-50, 224 px, bf16 on one H100/H200",
        }
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
