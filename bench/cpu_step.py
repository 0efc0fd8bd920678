"""What costs time in a CPU pretraining step: variants side by side in one run, with ratios.

Every variant trains the same RunConfig (``--config`` + ``--set``; without ``--config``, the MoCo v2 preset
at ResNet-18, 64 px, batch 64, queue 4,096; always an fp32 DeepSpeed engine at world size 1, the torch
data backend and a constant learning rate) from the same initial weights. Rounds are interleaved
(round r runs every variant for ``--steps`` steps after ``--warmup``), so load from other jobs on the
machine hits all variants alike, and every other round runs them in reverse order, so that no variant
always runs right after the same one; a variant's time is the median over all its timed steps and a
ratio is the median over rounds of the per-round ratio to the reference variant.

Step variants (in-memory batches made once by the torch backend, so no data loading is timed):

- ``deepspeed``: ``Trainer.train_step`` with DeepSpeed's default gradient reduction on (the reference);
- ``no_reduce``: what the trainer runs: DeepSpeed's gradient all-reduce turned off at world size 1
  (``engine.enable_backward_allreduce = False``, set by ``ilm_dist.train.engine.wrap``). With it on,
  DeepSpeed 0.19.8 at world size 1 and ZeRO stage 0 still runs ``DeepSpeedEngine._backward_epilogue ->
  allreduce_gradients -> buffered_allreduce_fallback``: it flattens every gradient into one buffer, scales
  it by 1/world, all-reduces it over gloo and copies it back, which changes nothing;
- ``no_reduce_channels_last``: ``no_reduce`` with NHWC inputs and key encoder (the trainer's weights stay
  NCHW: DeepSpeed's flat buffers need them contiguous);
- ``no_reduce_bf16_autocast``: ``no_reduce`` under ``torch.autocast("cpu", torch.bfloat16)``, fp32
  weights (what a bf16 route with fp32 master weights computes, ``engine.cpu_autocast=auto`` on an AMX
  CPU); its accuracy is checked separately: loss and gradients of one step against fp32 on the same batch
  and weights (``bf16_accuracy``);
- ``no_reduce_channels_last_bf16_autocast``: both (oneDNN's AMX kernels want NHWC);
- ``no_reduce_threads1``: ``no_reduce`` with ``torch.set_num_threads(1)`` (default: all cores).

Data-path variants (``--data``): two-view samples/s of the torch backend's loader alone, for
``num_workers`` in ``--workers`` with the config's augmentations and with crop + flips only
(``aug.color_jitter_p=0 aug.grayscale_p=0 aug.blur_p=0``), and milliseconds per view of each
augmentation (decode, crop + flips, + colour jitter without hue, + hue, + grayscale, + blur) on one core,
torchvision's transforms one image at a time beside ilm_dist's batched ``MocoViews``,
and end to end (``--e2e THREADS:WORKERS ...``): ``no_reduce`` steps fed by that loader, per torch thread
count and worker count, with both augmentation sets (2 cores: do the workers overlap or compete?).

``--profile``: the top operators of one ``deepspeed`` step by self CPU time (``torch.profiler``).

Usage::

    python bench/cpu_step.py --shards DATA_DIR [--set data.image_size=32 ...] [--rounds 5] [--data]
        [--variants no_reduce ...]   # the reference and these only (default: all)

Writes ``bench/results/cpu_step_<device>.json``: ``device``, ``commit``, ``command``, ``settings``,
``load_avg`` (before and after), ``variants`` (``samples_per_s``, ``step_ms``, ``step_cpu_ms``: the
process's CPU time per step, all threads, less sensitive to other jobs than wall time; ``rounds_ms``),
``ratios`` (``<variant>/deepspeed``: samples/s ratio, median and range over rounds), ``bf16_accuracy``
(per bf16 variant that ran),
``first_step_max_abs_weight_diff`` (every variant's weights after one step from the same state, against
the reference's: 0 where the variant computes the same update),
``data`` (``loader_samples_per_s``, ``ms_per_view_1core``, ``end_to_end_samples_per_s``) and ``profile``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import numpy as np
import torch
from common import ROOT, device_slug, source_commit, write_result
from moco_baseline import torchvision_view_transform
from torch.profiler import ProfilerActivity, profile

from ilm_dist.config import AugConfig, RunConfig, load_config
from ilm_dist.data import Placement, TwoViewBatch, build_pretrain_loader
from ilm_dist.data.augment import MocoViews
from ilm_dist.data.manifest import load_manifest
from ilm_dist.data.shard_reader import ShardReader
from ilm_dist.eval.fit import torch_threads
from ilm_dist.train.trainer import Trainer

PRESET = "configs/presets/mocov2.yaml"
PRESET_SIZE = ["model.arch=resnet18", "data.image_size=64", "data.batch_size=64", "moco.queue_size=4096"]
REFERENCE = "deepspeed"
# name -> (RunConfig overrides, torch threads or None for all cores, bf16 autocast); the reference alone
# keeps DeepSpeed's gradient reduction on
STEP_VARIANTS: dict[str, tuple[list[str], int | None, bool]] = {
    REFERENCE: ([], None, False),
    "no_reduce": ([], None, False),
    "no_reduce_channels_last": (["model.channels_last=true"], None, False),
    "no_reduce_bf16_autocast": ([], None, True),
    "no_reduce_channels_last_bf16_autocast": (["model.channels_last=true"], None, True),
    "no_reduce_threads1": ([], 1, False),
}
LIGHT_AUG = ["aug.color_jitter_p=0", "aug.grayscale_p=0", "aug.blur_p=0"]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=Path, required=True, help="packed dataset (data_tools.pack)")
    parser.add_argument(
        "--config", help=f"base RunConfig, its sizes kept (default: {PRESET} with {' '.join(PRESET_SIZE)})"
    )
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="RunConfig overrides")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds over all step variants")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant and round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant and round")
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=[name for name in STEP_VARIANTS if name != REFERENCE],
        help="step variants beside the reference (default: all)",
    )
    parser.add_argument("--data", action="store_true", help="also time the data path")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="loader workers to try")
    parser.add_argument("--data-batches", type=int, default=10, help="batches per loader measurement")
    parser.add_argument(
        "--e2e",
        nargs="*",
        default=["2:1", "2:0", "1:1", "1:0"],
        metavar="THREADS:WORKERS",
        help="end-to-end steps fed by the loader, per torch threads and loader workers",
    )
    parser.add_argument("--profile", action="store_true", help="top operators of one reference step")
    parser.add_argument("--out", type=Path, help="JSON path")
    return parser.parse_args()


def bench_config(args: argparse.Namespace, out: Path, extra: list[str] = ()) -> RunConfig:
    overrides = [
        *([] if args.config else PRESET_SIZE),
        "data.backend=torch",
        f"data.shards={args.shards}",
        "data.num_workers=0",
        f"engine.deepspeed_config={ROOT / 'configs/deepspeed/fp32.json'}",
        "optim.schedule=constant",
        "train.max_steps=1000000",
        "train.ckpt_every=0",
        f"output_dir={out}",
        *args.set,
        *extra,
    ]
    return load_config(ROOT / (args.config or PRESET), overrides)


# --------------------------------------------------------------------------- step variants


class StepVariant:
    """A trainer (own weights copy, same seed) plus what the variant changes around its step."""

    def __init__(self, trainer: Trainer, threads: int | None, autocast: bool):
        self.trainer, self.threads, self.autocast = trainer, threads, autocast

    def context(self) -> AbstractContextManager[None]:
        return torch.autocast("cpu", dtype=torch.bfloat16) if self.autocast else nullcontext()

    def run(self, batches: list[TwoViewBatch], count: int) -> list[tuple[float, float]]:
        """``count`` steps; (wall ms, process CPU ms) of each."""
        previous = torch.get_num_threads()
        torch.set_num_threads(self.threads or previous)
        times = []
        try:
            for i in range(count):
                start, cpu = time.perf_counter(), time.process_time()
                with self.context():
                    self.trainer.train_step(batches[i % len(batches)])
                times.append(((time.perf_counter() - start) * 1e3, (time.process_time() - cpu) * 1e3))
        finally:
            torch.set_num_threads(previous)
        return times


def with_reduce(trainer: Trainer) -> Trainer:
    """DeepSpeed's default: the gradient all-reduce runs even at world size 1 (the trainer turns it off)."""
    trainer.engine.enable_backward_allreduce = True
    return trainer


def build_variants(args: argparse.Namespace, tmp: Path) -> dict[str, StepVariant]:
    chosen = set(args.variants or STEP_VARIANTS) | {REFERENCE}
    variants = {}
    for name, (extra, threads, autocast) in STEP_VARIANTS.items():
        if name in chosen:
            trainer = Trainer(bench_config(args, tmp / name, extra))
            variants[name] = StepVariant(
                with_reduce(trainer) if name == REFERENCE else trainer, threads, autocast
            )
    return variants


def fixed_batches(trainer: Trainer, count: int) -> list[TwoViewBatch]:
    batches = []
    for batch in trainer.loader.epoch(0):
        batches.append(batch)
        if len(batches) == count:
            return batches
    if not batches:
        sys.exit(f"{trainer.cfg.data.shards}: fewer samples than one batch of {trainer.cfg.data.batch_size}")
    return batches


def time_variants(args: argparse.Namespace, variants: dict[str, StepVariant], batches) -> dict:
    rounds: dict[str, list[float]] = {name: [] for name in variants}
    steps: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
    for r in range(args.rounds):
        order = list(variants.items())
        for name, variant in order if r % 2 == 0 else reversed(order):
            variant.run(batches, args.warmup)
            times = variant.run(batches, args.steps)
            steps[name] += times
            rounds[name].append(statistics.median(wall for wall, _ in times))
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{n} {rounds[n][-1]:.0f} ms" for n in variants))
    batch = len(batches[0].view1)
    return {
        name: {
            "samples_per_s": round(batch / statistics.median(w for w, _ in steps[name]) * 1e3, 2),
            "step_ms": round(statistics.median(w for w, _ in steps[name]), 2),
            "step_cpu_ms": round(statistics.median(c for _, c in steps[name]), 2),
            "rounds_ms": [round(t, 2) for t in rounds[name]],
        }
        for name in variants
    }


def ratios(results: dict) -> dict:
    """samples/s of each variant over the reference: median and range of the per-round ratios."""
    ref = results[REFERENCE]["rounds_ms"]
    out = {}
    for name, result in results.items():
        if name == REFERENCE:
            continue
        per_round = [r / t for r, t in zip(ref, result["rounds_ms"], strict=True)]
        out[f"{name}/{REFERENCE}"] = {
            "median": round(statistics.median(per_round), 3),
            "range": [round(min(per_round), 3), round(max(per_round), 3)],
        }
    return out


# --------------------------------------------------------------------------- bf16 accuracy


def gradients(trainer: Trainer, batch: TwoViewBatch, autocast: bool) -> tuple[dict[str, float], torch.Tensor]:
    """Loss terms and the flat gradient of one step's loss (weights not updated)."""
    engine = trainer.engine
    context = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else nullcontext()
    with context:
        keys = trainer._key_features(batch.view2)
        terms = engine.module(batch.view1, keys, trainer.queue.keys)
    engine.module.zero_grad(set_to_none=True)
    terms["loss"].backward()
    grad = torch.cat([p.grad.flatten() for p in engine.module.parameters() if p.grad is not None])
    engine.module.zero_grad(set_to_none=True)
    return {k: float(v.detach()) for k, v in terms.items()}, grad


def bf16_accuracy(trainer: Trainer, batch: TwoViewBatch) -> dict:
    """bf16 autocast against fp32 on the same batch, weights, keys' encoder and queue."""
    fp32_terms, fp32_grad = gradients(trainer, batch, autocast=False)
    bf16_terms, bf16_grad = gradients(trainer, batch, autocast=True)
    cosine = torch.nn.functional.cosine_similarity(fp32_grad.double(), bf16_grad.double(), dim=0)
    rel = (bf16_grad.double() - fp32_grad.double()).norm() / fp32_grad.double().norm()
    return {
        "loss_fp32": fp32_terms["loss"],
        "loss_bf16": bf16_terms["loss"],
        "loss_relative_diff": abs(bf16_terms["loss"] - fp32_terms["loss"]) / abs(fp32_terms["loss"]),
        "grad_cosine": float(cosine),
        "grad_relative_l2": float(rel),
    }


# --------------------------------------------------------------------------- data path


def loader_rate(cfg: RunConfig, batches: int) -> float:
    """Two-view samples/s of the torch backend's loader alone (worker start-up included)."""
    where = Placement(0, 1, torch.device("cpu"), cfg.seed)
    loader = build_pretrain_loader(cfg.data, cfg.aug, where, load_manifest(cfg.data.shards))
    start, seen = time.perf_counter(), 0
    for i, batch in enumerate(loader.epoch(0)):
        seen += len(batch.view1)
        if i + 1 == batches:
            break
    return round(seen / (time.perf_counter() - start), 1)


def per_view_ms(images: list, aug: AugConfig, size: int) -> dict[str, float]:
    """Milliseconds per view: torchvision's transforms one image at a time (the usual way) and
    ilm_dist's MocoViews (parameters per sample, operations per batch of all ``images``)."""
    transform, views = torchvision_view_transform(aug, size), MocoViews(aug, size, views=2)
    torch.manual_seed(0)
    start = time.perf_counter()
    for image in images:
        transform(image)
    per_image = time.perf_counter() - start
    gen = np.random.default_rng(0)
    start = time.perf_counter()
    views.collate([views.sample(torch.from_numpy(np.array(image)), gen) for image in images])
    batched = (time.perf_counter() - start) / 2
    return {"per_image": per_image / len(images) * 1e3, "batched": batched / len(images) * 1e3}


def augmentation_costs(cfg: RunConfig, count: int = 64) -> dict[str, float | dict[str, float]]:
    """Milliseconds per view on one core, each stage adding one transform to the previous."""
    reader = ShardReader(load_manifest(cfg.data.shards), cfg.data.split)
    count = min(count, len(reader))
    start = time.perf_counter()
    images = [reader.image(i) for i in range(count)]
    costs = {"decode": (time.perf_counter() - start) / count * 1e3}
    jitter = list(cfg.aug.color_jitter)
    stages = {
        "crop_flips": AugConfig(
            **{**vars(cfg.aug), "color_jitter_p": 0.0, "grayscale_p": 0.0, "blur_p": 0.0}
        ),
        "+jitter_no_hue": AugConfig(
            **{**vars(cfg.aug), "color_jitter": [*jitter[:3], 0.0], "color_jitter_p": 1.0}
            | {"grayscale_p": 0.0, "blur_p": 0.0}
        ),
        "+hue": AugConfig(**{**vars(cfg.aug), "color_jitter_p": 1.0, "grayscale_p": 0.0, "blur_p": 0.0}),
        "+grayscale": AugConfig(
            **{**vars(cfg.aug), "color_jitter_p": 1.0, "grayscale_p": 1.0, "blur_p": 0.0}
        ),
        "+blur": AugConfig(**{**vars(cfg.aug), "color_jitter_p": 1.0, "grayscale_p": 1.0, "blur_p": 1.0}),
        "config": cfg.aug,
    }
    with torch_threads(1):
        for name, aug in stages.items():
            per_view = per_view_ms(images, aug, cfg.data.image_size)
            costs[name] = {k: round(v, 3) for k, v in per_view.items()}
    costs["decode"] = round(costs["decode"], 3)
    return costs


def data_path(args: argparse.Namespace, tmp: Path) -> dict:
    result: dict = {"loader_samples_per_s": {}}
    for label, extra in (("config_aug", []), ("crop_flips_only", LIGHT_AUG)):
        for workers in args.workers:
            cfg = bench_config(args, tmp / "data", [*extra, f"data.num_workers={workers}"])
            with torch_threads(1):
                rate = loader_rate(cfg, args.data_batches)
            result["loader_samples_per_s"][f"{label}/workers{workers}"] = rate
            print(f"loader {label} workers={workers}: {rate} two-view samples/s", flush=True)
    result["ms_per_view_1core"] = augmentation_costs(bench_config(args, tmp / "data"))
    result["end_to_end_samples_per_s"] = end_to_end(args, tmp)
    return result


def end_to_end(args: argparse.Namespace, tmp: Path) -> dict[str, float]:
    """Two-view samples/s of ``no_reduce`` steps fed by the torch loader, per torch threads x workers."""
    rates = {}
    for combo in args.e2e:
        threads, workers = (int(x) for x in combo.split(":"))
        for label, extra in (("config_aug", []), ("crop_flips_only", LIGHT_AUG)):
            cfg = bench_config(args, tmp / f"e2e_{combo}_{label}", [*extra, f"data.num_workers={workers}"])
            trainer = Trainer(cfg)
            with torch_threads(threads):
                start = time.perf_counter() if args.warmup == 0 else None
                seen = 0
                for i, batch in enumerate(trainer.loader.epoch(0)):
                    trainer.train_step(batch)
                    if i + 1 == args.warmup:
                        start = time.perf_counter()  # timing starts after the warm-up steps
                    elif start is not None:
                        seen += len(batch.view1)
                    if i + 1 == args.warmup + args.data_batches:
                        break
            key = f"{label}/threads{threads}_workers{workers}"
            rates[key] = round(seen / (time.perf_counter() - start), 2) if start and seen else None
            print(f"end to end {key}: {rates[key]} two-view samples/s", flush=True)
    return rates


# --------------------------------------------------------------------------- profile


def top_ops(step: Callable[[], object], rows: int = 15) -> list[dict]:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:rows]
    return [
        {"op": e.key, "self_cpu_ms": round(e.self_cpu_time_total / 1e3, 2), "calls": e.count} for e in events
    ]


# --------------------------------------------------------------------------- main


def first_step_differences(variants: dict[str, StepVariant], batch: TwoViewBatch) -> dict[str, float]:
    """One step of every variant from the same weights: max |weight - reference weight| afterwards."""
    for variant in variants.values():
        variant.run([batch], 1)
    reference = list(variants[REFERENCE].trainer.engine.module.parameters())
    return {
        name: max(
            float((p.detach() - r.detach()).abs().max())
            for p, r in zip(variant.trainer.engine.module.parameters(), reference, strict=True)
        )
        for name, variant in variants.items()
        if name != REFERENCE
    }


def run(args: argparse.Namespace, tmp: Path) -> dict:
    variants = build_variants(args, tmp)
    batches = fixed_batches(variants[REFERENCE].trainer, 4)
    accuracy = {
        name: bf16_accuracy(variant.trainer, batches[0])
        for name, variant in variants.items()
        if variant.autocast
    }
    differences = first_step_differences(variants, batches[0])
    results = time_variants(args, variants, batches)
    reference = variants[REFERENCE]
    profile_rows = top_ops(lambda: reference.run(batches, 1)) if args.profile else None
    return {
        "variants": results,
        "ratios": ratios(results),
        "bf16_accuracy": accuracy,
        "first_step_max_abs_weight_diff": differences,
        "data": data_path(args, tmp) if args.data else None,
        "profile": profile_rows,
    }


def main() -> None:
    args = parse_args()
    torch.manual_seed(0)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="ilm_dist_cpu_step_") as tmp:
        result = run(args, Path(tmp))
    cpu = torch.device("cpu")
    record = {
        "device": device_slug(cpu),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "commit": source_commit("bench/cpu_step.py", "ilm_dist"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "load_avg": {"before": load_before, "after": os.getloadavg()},
        "notes": "medians over interleaved rounds; other jobs on a shared machine add noise (see load_avg)",
        **result,
    }
    for name, ratio in record["ratios"].items():
        print(f"{name}: {ratio['median']}x samples/s (range {ratio['range'][0]}-{ratio['range'][1]})")
    for name, accuracy in result["bf16_accuracy"].items():
        print(f"{name} vs fp32:", {k: round(v, 5) for k, v in accuracy.items()})
    write_result(record, args.out or ROOT / "bench" / "results" / f"cpu_step_{record['device']}.json")


if __name__ == "__main__":
    main()
