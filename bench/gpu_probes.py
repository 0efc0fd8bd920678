"""Probes of the data and training paths for bench/gpu_check.sh (stages dali_buffers, dali_epochs, train_step).

Each subcommand writes one JSON and exits non-zero when its check fails; on a CPU the same code runs at tiny
sizes (the check's dry run), where there is no stream to race and no device memory to measure::

    python bench/gpu_probes.py dali-buffers --shards DIR --out FILE  # DALI's zero-copy batches vs the GPU
    python bench/gpu_probes.py dali-epochs --shards DIR --out FILE   # per-epoch rebuilds; resume replay
    python bench/gpu_probes.py train-step --shards DIR --out FILE    # host syncs and peak memory of a step

``dali-buffers``: with DALI 2.4's default (dynamic) executor ``DALIGenericIterator`` hands over DALI's own
output memory through DLPack instead of copying it (nvidia/dali/plugin/pytorch/__init__.py: ``copy = not
is_exec_dynamic``), so in fp32 a training batch is DALI's memory, released on the host when the next batch
arrives while kernels that read it may still be queued. DALI 2.4 defers that release: a DLPack tensor that
shares a buffer hands it, when deleted, to a thread that frees it only after a ``cudaDeviceSynchronize``
begun after the deletion (dali/pipeline/data/dltensor.h, ``DLTensorResource<SharedTensorPayload>``, and
dltensor.cc, ``DLTensorGraveyard``; libdali.so 2.4 exports ``dali::EnqueueForDeletion``), so no copy is made
here. The probe tests that on the GPU: it copies a batch, queues a long kernel and then a second copy of the
batch on a side stream, drops the batch, pulls further batches (DALI decodes them meanwhile) and compares
the two copies bit for bit. A copy on torch's side would not help: the copy kernel itself reads DALI's memory
after the host released it; DALI's own copying path (``exec_dynamic=False``) blocks the host for each batch.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable
from contextlib import closing
from itertools import islice
from pathlib import Path

import torch
from common import ROOT, write_result

from ilm_dist.config import AugConfig, DataConfig
from ilm_dist.data.batch import Placement, TwoViewBatch
from ilm_dist.data.dali_backend import DaliLoader
from ilm_dist.data.manifest import load_manifest

MIB = 2**20
STACK_FRAMES = 4  # innermost Python frames kept per synchronizing call


def main() -> None:
    args = parse_args()
    result = args.func(args)
    write_result(result, args.out)
    print(json.dumps(result, indent=2))
    if result["problems"]:
        sys.exit("; ".join(result["problems"]))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(required=True)
    buffers = add_probe(sub, "dali-buffers", cmd_dali_buffers, batch=32, size=64)
    buffers.add_argument("--pulls", type=int, default=5, help="batches pulled while the read is queued")
    buffers.add_argument("--sleep-cycles", type=int, default=2_000_000_000, help="the long kernel (~1 s)")
    epochs = add_probe(sub, "dali-epochs", cmd_dali_epochs, batch=32, size=64)
    epochs.add_argument("--epochs", type=int, default=20)
    epochs.add_argument("--steps", type=int, default=2, help="batches per (tiny) epoch")
    epochs.add_argument("--leak-mib", type=float, default=256, help="memory lost after epoch 5 that fails")
    epochs.add_argument("--resume-at", type=int, default=3, help="step the resumed epoch starts at")
    epochs.add_argument("--compare", type=int, default=2, help="batches compared after it")
    step = add_probe(sub, "train-step", cmd_train_step, batch=256, size=224)
    step.add_argument("--arch", default="resnet50")
    step.add_argument("--ds-config", help="DeepSpeed JSON (default: bf16_zero1 on CUDA, fp32 on CPU)")
    step.add_argument("--warmup", type=int, default=2, help="steps before the measured ones")
    step.add_argument("--sync-steps", type=int, default=3, help="steps under set_sync_debug_mode('warn')")
    step.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="RunConfig overrides")
    return parser.parse_args()


def add_probe(sub, name: str, func: Callable, batch: int, size: int) -> argparse.ArgumentParser:
    probe = sub.add_parser(name, help=func.__doc__.split("\n")[0])
    probe.add_argument("--shards", type=Path, required=True, help="packed dataset (the check's data stage)")
    probe.add_argument("--batch", type=int, default=batch)
    probe.add_argument("--size", type=int, default=size, help="view side")
    probe.add_argument("--seed", type=int, default=0)
    probe.add_argument("--out", type=Path, required=True)
    probe.set_defaults(func=func)
    return probe


def device() -> torch.device:
    """The training device: this process's current GPU, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def dali_loader(args: argparse.Namespace) -> DaliLoader:
    """The DALI backend as training builds it (shuffle buffer, prefetch and decoder load by default)."""
    data = DataConfig(
        backend="dali",
        shards=str(args.shards),
        image_size=args.size,
        batch_size=args.batch,
        num_workers=os.cpu_count() or 1,
    )
    return DaliLoader(data, AugConfig(), Placement(0, 1, device(), args.seed), load_manifest(args.shards))


# --------------------------------------------------------------------------- dali-buffers


def cmd_dali_buffers(args: argparse.Namespace) -> dict:
    """Whether a DALI batch stays intact for a read queued before it was dropped and further batches came."""
    loader = dali_loader(args)
    batches = loader.epoch(0)
    batch = next(batches)
    views = (batch.view1, batch.view2)
    before = [v.clone() for v in views]
    pointers = {v.data_ptr() for v in views}
    after, done = queued_copies(views, args.sleep_cycles)
    del batch, views  # the generator drops DALI's outputs at the next pull, as in training
    reused = 0
    for pulled in islice(batches, args.pulls):
        reused += len(pointers & {pulled.view1.data_ptr(), pulled.view2.data_ptr()})
    pending = None if done is None else not done.query()
    synchronize()
    intact = all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    problems = [] if intact else ["a dropped DALI batch changed while a queued kernel still read it"]
    if pending is False:
        problems.append(
            f"inconclusive: the long kernel ended before {args.pulls} batches came (--sleep-cycles)"
        )
    return {
        "device": str(device()),
        "batch_elements": before[0].numel(),
        "pulls": args.pulls,
        "read_still_queued_after_pulls": pending,
        "dropped_buffers_reused_by_pulls": reused,
        "intact": intact,
        "problems": problems,
    }


def queued_copies(
    views: tuple[torch.Tensor, ...], cycles: int
) -> tuple[list[torch.Tensor], torch.cuda.Event | None]:
    """Copies of ``views`` queued behind a kernel of ``cycles`` clock cycles on a side stream (so DALI's work
    cannot wait behind it), and an event after them; on a CPU, plain copies and None."""
    if views[0].device.type != "cuda":
        return [v.clone() for v in views], None
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(cycles)
        copies = [v.clone() for v in views]
        done = torch.cuda.Event()
        done.record()
    return copies, done


# --------------------------------------------------------------------------- dali-epochs


def cmd_dali_epochs(args: argparse.Namespace) -> dict:
    """Time to the first batch and memory over many tiny epochs (a pipeline each), and a resume replay."""
    loader = dali_loader(args)
    if (
        min(args.epochs, args.steps, args.compare, args.resume_at + 1) < 1
        or args.resume_at + args.compare > loader.steps_per_epoch
    ):
        sys.exit(
            f"dali-epochs: need --epochs, --steps, --compare >= 1 and --resume-at + --compare <= "
            f"{loader.steps_per_epoch} (steps per epoch)"
        )
    epochs = [tiny_epoch(loader, epoch, args.steps) for epoch in range(args.epochs)]
    key = "free_mib" if loader.device_id is not None else "rss_mib"
    settled = epochs[min(4, len(epochs) - 1)][key]  # after the first epochs' one-time allocations
    lost = settled - epochs[-1][key] if key == "free_mib" else epochs[-1][key] - settled
    replay = resume_replay(loader, 1, args.resume_at, args.compare)
    problems = []
    if lost > args.leak_mib:
        problems.append(f"{lost:.0f} MiB lost from epoch {min(5, len(epochs))} to {len(epochs)} ({key})")
    if replay["fresh"] != replay["resumed"]:
        problems.append(f"a resumed epoch differs from a fresh one: {replay}")
    first = [e["first_batch_s"] for e in epochs]
    return {
        "device": str(device()),
        "steps_per_epoch_run": args.steps,
        "first_batch_s": {"median": sorted(first)[len(first) // 2], "max": max(first)},
        f"{key}_lost_after_epoch_5": round(lost, 1),
        "epochs": epochs,
        "resume_replay": replay,
        "problems": problems,
    }


def tiny_epoch(loader: DaliLoader, epoch: int, steps: int) -> dict:
    """``steps`` batches of ``epoch`` (a fresh pipeline), then memory once the pipeline is gone."""
    start = time.perf_counter()
    with closing(loader.epoch(epoch)) as batches:
        next(batches)
        synchronize()
        first = time.perf_counter() - start
        for _ in islice(batches, steps - 1):
            pass
    gc.collect()
    synchronize()
    return {"epoch": epoch, "first_batch_s": round(first, 3), **memory_mib()}


def memory_mib() -> dict[str, float]:
    """Free device memory (what a leaked pipeline would hold) on CUDA; this process's resident set on CPU."""
    if torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info()
        return {
            "free_mib": round(free / MIB, 1),
            "torch_allocated_mib": round(torch.cuda.memory_allocated() / MIB, 1),
        }
    status = Path("/proc/self/status").read_text()
    kib = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
    return {"rss_mib": round(kib / 1024, 1)}


def resume_replay(loader: DaliLoader, epoch: int, start: int, count: int) -> dict:
    """Digests of batches ``start .. start + count - 1`` of ``epoch``, fresh and resumed at ``start``."""
    with closing(loader.epoch(epoch)) as fresh:
        fresh_digests = [digest(b) for b in islice(fresh, start + count)][start:]
    with closing(loader.epoch(epoch, start)) as resumed:
        resumed_digests = [digest(b) for b in islice(resumed, count)]
    return {"epoch": epoch, "start_step": start, "fresh": fresh_digests, "resumed": resumed_digests}


def digest(batch: TwoViewBatch) -> str:
    """SHA-256 of the batch's bytes (views, labels, indices): equal only if bit-identical."""
    sha = hashlib.sha256()
    for tensor in (batch.view1, batch.view2, batch.labels, batch.indices):
        sha.update(tensor.detach().contiguous().cpu().numpy().tobytes())
    return sha.hexdigest()[:16]


# --------------------------------------------------------------------------- train-step


def cmd_train_step(args: argparse.Namespace) -> dict:
    """Peak memory of one training step and the host-device syncs of a few (Trainer.train_step, DALI data)."""
    from pretrain_throughput import endless  # the trainer's imports: only this probe pays for them

    from ilm_dist import distributed as D
    from ilm_dist.config import load_config
    from ilm_dist.train.trainer import Trainer

    if args.warmup < 0 or args.sync_steps < 1:
        sys.exit("need --warmup >= 0 and --sync-steps >= 1")
    with tempfile.TemporaryDirectory(prefix="ilm_dist_probe_") as out:
        trainer = Trainer(load_config(ROOT / "configs/presets/mocov2.yaml", step_overrides(args, Path(out))))
        batches = endless(trainer.loader)

        def step() -> None:
            trainer.train_step(next(batches))

        for _ in range(args.warmup):
            step()
        result = {"device": str(trainer.device), "engine": engine_settings(trainer.engine)}
        result["memory"] = step_memory(step)
        result["sync_calls"] = sync_calls(step, args.sync_steps) if trainer.device.type == "cuda" else None
        D.shutdown()
    calls = result["sync_calls"]
    result["sync_calls_per_step"] = (
        None if calls is None else sum(c["count"] for c in calls) / args.sync_steps
    )
    return result | {"problems": []}


def step_overrides(args: argparse.Namespace, out: Path) -> list[str]:
    """The throughput benchmark's MoCo + BT step (configs/presets/mocov2.yaml, official loss weights)."""
    from pretrain_throughput import LOSSES

    from ilm_dist.ops import extension_available

    cuda = torch.cuda.is_available()
    ds_config = args.ds_config or f"configs/deepspeed/{'bf16_zero1' if cuda else 'fp32'}.json"
    return [
        *LOSSES["bt"],
        f"loss.bt.impl={'ext' if extension_available() else 'torch'}",
        f"model.arch={args.arch}",
        "model.channels_last=true",
        "data.backend=dali",
        f"data.shards={args.shards}",
        f"data.image_size={args.size}",
        f"data.batch_size={args.batch}",
        f"data.num_workers={os.cpu_count()}",
        f"engine.deepspeed_config={ROOT / ds_config}",
        "optim.schedule=constant",
        f"train.max_steps={args.warmup + 1 + args.sync_steps}",
        f"seed={args.seed}",
        f"output_dir={out}",
        *args.set,
    ]


def engine_settings(engine) -> dict:
    """What sizes the step's gradient buffers: ZeRO stage, bucket sizes (elements), clipping, parameters."""
    params = [p for p in engine.module.parameters() if p.requires_grad]
    return {
        "zero_stage": engine.zero_optimization_stage(),
        "reduce_bucket_size": engine.zero_reduce_bucket_size(),
        "allgather_bucket_size": engine.zero_allgather_bucket_size(),
        "gradient_clipping": engine.gradient_clipping(),
        "trainable_parameters": sum(p.numel() for p in params),
        "trainable_mib_fp32": round(sum(p.numel() for p in params) * 4 / MIB, 1),
    }


def step_memory(step: Callable[[], None]) -> dict | None:
    """torch.cuda.max_memory_allocated over one step, and what was allocated before it (None on CPU)."""
    if not torch.cuda.is_available():
        return None
    synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    synchronize()
    peak = torch.cuda.max_memory_allocated()
    return {
        "allocated_before_step_mib": round(before / MIB, 1),
        "peak_allocated_mib": round(peak / MIB, 1),
        "peak_above_before_mib": round((peak - before) / MIB, 1),
        "reserved_mib": round(torch.cuda.memory_reserved() / MIB, 1),
    }


def sync_calls(step: Callable[[], None], steps: int) -> list[dict]:
    """The synchronizing CUDA calls of ``steps`` steps (torch.cuda.set_sync_debug_mode("warn"): a warning per
    call, replayed on this thread for the backward's), grouped by message and innermost Python frames."""
    calls: Counter = Counter()

    def record(message, category, filename, lineno, file=None, line=None) -> None:
        if "synchroniz" not in str(message):
            return
        frames = [f for f in traceback.extract_stack()[:-1] if not f.filename.endswith("warnings.py")]
        where = tuple(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in frames[-STACK_FRAMES:])
        calls[(str(message).splitlines()[0][:200], where)] += 1

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(steps):
                step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return [{"message": m, "stack": list(where), "count": n} for (m, where), n in calls.most_common()]


if __name__ == "__main__":
    main()
