"""Two-view samples per second of the data backends, on the same packed shards, in one run.

Variants: ``dali_gpu`` (nvJPEG decode + augmentations on the GPU), ``dali_cpu`` (the same DALI graph on
the CPU, one thread per core) and ``torch`` (``TorchLoader``: DataLoader with one worker per core,
torchvision augmentations). Every variant delivers its batches to the training device (``TwoViewBatch.to``),
so a CPU variant on a GPU machine pays its host-to-device copy. On a GPU the run also times one bf16
ResNet-50 MoCo step (query forward + backward, key forward) at the same batch, i.e. how many samples per
second training consumes, to show whether the DALI GPU path keeps up (measured separately: when both
share the GPU, DALI's kernels take some of the step's time).

Usage::

    python bench/data_pipeline.py [--shards DIR] [--samples 512] [--batch 32] [--size 224] [--repeats 3]

Without ``--shards`` it first packs a synthetic set (``python -m data_tools.synthetic_dataset``) of
``--source-size`` px images. Writes ``bench/results/data_pipeline_<device>.json``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import ROOT, device_slug, source_commit, write_result

from ilm_dist.config import DataConfig, RunConfig
from ilm_dist.data.batch import Placement
from ilm_dist.data.manifest import load_manifest
from ilm_dist.data.torch_backend import TorchLoader

NUM_CLASSES = 8


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=Path, help="packed dataset (default: pack a synthetic one)")
    parser.add_argument("--split", default="train")
    parser.add_argument("--samples", type=int, default=512, help="two-view samples timed per variant")
    parser.add_argument("--warmup", type=int, default=2, help="batches run before timing")
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed runs per variant (the median is reported)"
    )
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=224, help="view side")
    parser.add_argument("--source-size", type=int, default=256, help="side of the synthetic images")
    parser.add_argument(
        "--out", type=Path, help="JSON path (default bench/results/data_pipeline_<device>.json)"
    )
    return parser.parse_args()


def pack_synthetic(out: Path, samples: int, size: int) -> Path:
    """A synthetic packed set whose train split (80%) holds at least ``samples`` images."""
    per_class = -(-samples * 5 // 4 // NUM_CLASSES)
    cmd = [
        sys.executable,
        "-m",
        "data_tools.synthetic_dataset",
        str(out),
        "--num-classes",
        str(NUM_CLASSES),
        "--per-class",
        str(per_class),
        "--size",
        str(size),
        "--quiet",
    ]
    subprocess.run(cmd, check=True, cwd=ROOT)
    return out


def make_cfg(args: argparse.Namespace, shards: Path, backend: str) -> RunConfig:
    data = DataConfig(
        backend=backend,
        shards=str(shards),
        split=args.split,
        image_size=args.size,
        batch_size=args.batch,
        num_workers=os.cpu_count() or 1,
    )
    return RunConfig(data=data)


def samples_per_s(loader, device: torch.device, args: argparse.Namespace) -> float:
    """Time ``args.samples`` two-view samples after ``args.warmup`` batches, delivered to ``device``."""
    steps = -(-args.samples // args.batch)
    done, start, epoch = -args.warmup, 0.0, 0
    while done < steps:
        for batch in loader.epoch(epoch):
            batch.to(device, torch.float32, channels_last=False)
            done += 1
            if done == 0:
                start = _now(device)
            if done == steps:
                break
        epoch += 1
    return steps * args.batch / (_now(device) - start)


def moco_step_samples_per_s(batch: int, size: int, device: torch.device, steps: int = 10) -> float:
    """Samples/s of a bf16 ResNet-50 MoCo step: query forward + backward, key forward (He et al. 2020)."""
    from torchvision.models import resnet50

    query = resnet50().to(device, memory_format=torch.channels_last)
    key = resnet50().to(device, memory_format=torch.channels_last)
    opt = torch.optim.SGD(query.parameters(), lr=0.03, momentum=0.9)
    views = torch.randn(2, batch, 3, size, size, device=device).to(memory_format=torch.channels_last)
    for step in range(steps + 3):
        if step == 3:
            start = _now(device)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            with torch.no_grad():
                target = key(views[1])
            loss = (query(views[0]) - target).float().pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return steps * batch / (_now(device) - start)


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def dali_loader() -> tuple[type | None, str | None]:
    """DaliLoader, or None and why it cannot be imported (the torch variant still runs)."""
    try:
        from ilm_dist.data.dali_backend import DaliLoader
    except ImportError as err:
        return None, f"DALI not importable ({err})"
    return DaliLoader, None


def run_variants(args: argparse.Namespace, shards: Path, device: torch.device) -> dict[str, dict]:
    dali, no_dali = dali_loader()
    cpu, cuda = torch.device("cpu"), device if device.type == "cuda" else None
    plans = {
        "dali_gpu": (dali, "dali", cuda),
        "dali_cpu": (dali, "dali", cpu),
        "torch": (TorchLoader, "torch", cpu),
    }
    skipped = {}
    for name, (factory, _, where) in plans.items():
        if factory is None:
            skipped[name] = no_dali
        elif where is None:
            skipped[name] = "no CUDA device on this machine"
    manifest = load_manifest(shards)
    loaders = {
        name: factory(
            cfg.data, cfg.aug, Placement(rank=0, world_size=1, device=where, seed=cfg.seed), manifest
        )
        for name, (factory, backend, where) in plans.items()
        if name not in skipped
        for cfg in [make_cfg(args, shards, backend)]
    }
    runs: dict[str, list[float]] = {name: [] for name in loaders}
    for _ in range(args.repeats):  # interleaved, so a busy moment on a shared machine hits every variant
        for name, loader in loaders.items():
            runs[name].append(samples_per_s(loader, device, args))
            print(f"{name:9s} {runs[name][-1]:9.1f} two-view samples/s", flush=True)
    results = {}
    for name in plans:
        if name in skipped:
            results[name] = {"samples_per_s": None, "reason": skipped[name]}
            continue
        rates = [round(rate, 1) for rate in runs[name]]
        results[name] = {
            "samples_per_s": statistics.median(rates),
            "runs": rates,
            "description": loaders[name].description,
        }
    return results


def ratios(variants: dict[str, dict], moco: float | None) -> dict[str, float]:
    rate = {name: v["samples_per_s"] for name, v in variants.items() if v["samples_per_s"]}
    pairs = [("dali_gpu", "torch"), ("dali_gpu", "dali_cpu"), ("dali_cpu", "torch")]
    out = {f"{a}/{b}": round(rate[a] / rate[b], 2) for a, b in pairs if a in rate and b in rate}
    if moco and "dali_gpu" in rate:
        out["dali_gpu/resnet50_moco_step"] = round(rate["dali_gpu"] / moco, 2)
    return out


def main() -> None:
    args = parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    load_before = os.getloadavg()  # other work on the machine skews the numbers
    with tempfile.TemporaryDirectory(prefix="ilm_dist_bench_") as tmp:
        shards = args.shards or pack_synthetic(Path(tmp) / "synthetic", args.samples, args.source_size)
        variants = run_variants(args, shards, device)
    moco = None
    if device.type == "cuda":
        moco = moco_step_samples_per_s(args.batch, args.size, device)
        print(f"resnet50 bf16 MoCo step consumes {moco:.1f} samples/s at batch {args.batch}")
    result = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({os.cpu_count()} cores)",
        "commit": source_commit(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "load_average_before": [round(load, 2) for load in load_before],
        "settings": {
            "samples": args.samples,
            "batch": args.batch,
            "size": args.size,
            "warmup": args.warmup,
            "repeats": args.repeats,
            "shards": str(args.shards)
            if args.shards
            else f"data_tools.synthetic_dataset at {args.source_size} px",
        },
        "variants": variants,
        "resnet50_moco_step": {"samples_per_s": round(moco, 1)}
        if moco
        else {"samples_per_s": None, "reason": "needs a CUDA device"},
        "ratios": ratios(variants, moco),
    }
    for pair, value in result["ratios"].items():
        print(f"{pair}: {value}x")
    out = args.out or ROOT / "bench" / "results" / f"data_pipeline_{device_slug(device)}.json"
    write_result(result, out)


if __name__ == "__main__":
    main()
