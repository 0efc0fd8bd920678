"""Forward+backward time and peak memory of the bt_xcorr_loss op (ilm_dist._C) vs the official per-layer loop.

The reference is the official Barlow Twins code applied layer by layer: ``BatchNorm1d(affine=False)`` on
each view, the D x D matmul, ``diagonal().add_(-1).pow_(2).sum()`` and ``off_diagonal(c).pow_(2).sum()``,
run in the inputs' dtype (plain PyTorch). The op takes all L layers at once and accumulates in fp32.

Usage::

    python bench/xcorr.py [--sizes full|small|tiny] [--dtypes float32 bfloat16] [--repeats 3]
                          [--device cpu|cuda] [--threads T] [--out PATH]

``full``: L = 4, N in {64, 256, 1024, 4096}, D in {512, 2048, 8192}; ``small``: N up to 1024 and without
D = 8192, for CPUs (on 2 cores the official loop at D = 8192 takes tens of seconds per step); ``tiny``: a
smoke test of both formulations. Times are medians over
``--repeats`` runs after one warm-up, with the op and the reference interleaved; on a CPU also the medians of
the process's CPU time (``*_cpu_ms``, ``speedup_cpu_time``), which other jobs on a shared machine disturb
far less than wall time. Each case records the
formulation the op chose by cost (``gram``: N x N Gram matrices, ``xcorr``: the D x D cross-correlation,
saved for the backward) and the JSON the op's self-check verdict per dtype. Peak memory is the peak
of the bytes allocated during one forward+backward above what was allocated before it:
``torch.cuda.max_memory_allocated`` on CUDA; on CPU the allocation events of ``torch.profiler``
(``profile_memory=True``), which see every tensor allocation of the CPU allocator but not the internal
scratch space of BLAS libraries (null if the profiler gives no events). Writes
``bench/results/xcorr_<device>.json``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from common import ROOT, device_slug, source_commit, write_result
from torch import Tensor

from ilm_dist.ops import bt_xcorr_loss, check_extension, extension_available
from ilm_dist.ops.xcorr import tf32_enabled

LAYERS = 4
EPS = 1e-5
SIZES = {
    "full": ([64, 256, 1024, 4096], [512, 2048, 8192]),
    "small": ([64, 256, 1024], [512, 2048]),
    "tiny": ([16, 48], [40]),  # both formulations in seconds: the GPU check's dry run
}
LossFn = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", choices=sorted(SIZES), default="full")
    parser.add_argument(
        "--dtypes", nargs="+", choices=["float32", "bfloat16"], default=["float32", "bfloat16"]
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per case and implementation")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads); default: torch's")
    parser.add_argument("--out", type=Path, help="JSON path (default bench/results/xcorr_<device>.json)")
    return parser.parse_args()


def off_diagonal(x: Tensor) -> Tensor:
    n = x.shape[0]
    return x.flatten()[:-1].view(n - 1, n + 1)[:, 1:].flatten()


def official_loss(z1: Tensor, z2: Tensor, on: Tensor, off: Tensor) -> Tensor:
    """The official Barlow Twins loss of each layer, one layer at a time."""
    losses = []
    for layer in range(z1.shape[0]):
        a = F.batch_norm(z1[layer], None, None, training=True, eps=EPS)
        b = F.batch_norm(z2[layer], None, None, training=True, eps=EPS)
        c = a.T @ b
        c.div_(z1.shape[1])
        on_diag = torch.diagonal(c).add_(-1).pow_(2).sum()
        off_diag = off_diagonal(c).pow_(2).sum()
        losses.append(on[layer] * on_diag + off[layer] * off_diag)
    return torch.stack(losses)


def op_loss(z1: Tensor, z2: Tensor, on: Tensor, off: Tensor) -> Tensor:
    return bt_xcorr_loss(z1, z2, on, off, EPS, impl="ext")


def make_inputs(n: int, d: int, dtype: torch.dtype, device: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Leaf views z1, z2: [LAYERS, n, d] (correlated) and the per-layer weights."""
    z1 = torch.randn(LAYERS, n, d, device=device).to(dtype).requires_grad_()
    z2 = (0.5 * z1.detach() + torch.randn_like(z1)).requires_grad_()
    on = torch.full((LAYERS,), 1.0, device=device)
    off = torch.full((LAYERS,), 5e-3, device=device)
    return z1, z2, on, off


def formulation(n: int, d: int, dtype: torch.dtype, device: str) -> str:
    """The op's choice for this shape: "gram" when it returns no D x D cross-correlation, else "xcorr"."""
    with torch.no_grad():
        _, xcorr = torch.ops.ilm_dist.bt_xcorr_loss(*make_inputs(n, d, dtype, device), EPS)
    return "gram" if xcorr.numel() == 0 else "xcorr"


def make_step(fn: LossFn, n: int, d: int, dtype: torch.dtype, device: str) -> Callable[[], None]:
    """One forward+backward of fn on fresh leaf inputs [LAYERS, n, d]."""
    z1, z2, on, off = make_inputs(n, d, dtype, device)

    def step() -> None:
        fn(z1, z2, on, off).sum().backward()
        z1.grad = z2.grad = None

    return step


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_ms(step: Callable[[], None], device: str) -> tuple[float, float]:
    """Wall and process CPU milliseconds of one step (CPU time: all of the process's threads)."""
    sync(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    step()
    sync(device)
    return (time.perf_counter() - start) * 1e3, (time.process_time() - cpu_start) * 1e3


def peak_bytes(step: Callable[[], None], device: str) -> int | None:
    """Peak bytes allocated during step() above those allocated before it."""
    if device.startswith("cuda"):
        sync(device)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        sync(device)
        return torch.cuda.max_memory_allocated() - base
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
    ) as prof:
        step()
    events = sorted(
        (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
    )
    if not events:
        return None
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return peak


def run_case(n: int, d: int, dtype: torch.dtype, args: argparse.Namespace) -> dict:
    steps = {
        name: make_step(fn, n, d, dtype, args.device)
        for name, fn in (("ref", official_loss), ("op", op_loss))
    }
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in steps}
    for step in steps.values():
        step()  # warm-up
    for _ in range(args.repeats):
        for name, step in steps.items():
            times[name].append(time_ms(step, args.device))
    case = {"L": LAYERS, "N": n, "D": d, "dtype": str(dtype).removeprefix("torch.")}
    case["formulation"] = formulation(n, d, dtype, args.device)
    cpu = not args.device.startswith("cuda")
    for name, step in steps.items():
        case[f"{name}_ms"] = round(statistics.median(wall for wall, _ in times[name]), 3)
        if cpu:
            case[f"{name}_cpu_ms"] = round(statistics.median(c for _, c in times[name]), 3)
        case[f"{name}_peak_bytes"] = peak_bytes(step, args.device)
    case["speedup"] = round(case["ref_ms"] / case["op_ms"], 2)
    if cpu:  # robust to other jobs on a shared machine (with --threads 1, wall time on an idle one)
        case["speedup_cpu_time"] = round(case["ref_cpu_ms"] / case["op_cpu_ms"], 2)
    if case["ref_peak_bytes"] and case["op_peak_bytes"]:
        case["memory_ratio"] = round(case["ref_peak_bytes"] / case["op_peak_bytes"], 2)
    return case


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not extension_available():
        sys.exit("bench/xcorr.py needs the ilm_dist._C extension: pip install --no-build-isolation -e .")
    device = torch.device(args.device)
    device_type = device.type
    if device_type == "cuda":
        device = torch.device(
            "cuda", device.index if device.index is not None else torch.cuda.current_device()
        )
    self_check = {
        name: check_extension(device, getattr(torch, name)) or "passed" for name in args.dtypes
    }  # before any timing; op_loss would raise on a failed check
    ns, ds = SIZES[args.sizes]
    load_before = os.getloadavg()  # other work on the machine skews the wall times
    cases = []
    print(
        f"{'dtype':>8} {'N':>5} {'D':>5} {'form':>5} {'ref ms':>9} {'op ms':>9} {'speedup':>8} "
        f"{'cpu-time':>8} {'ref MiB':>9} {'op MiB':>9}"
    )
    for dtype_name in args.dtypes:
        for n in ns:
            for d in ds:
                case = run_case(n, d, getattr(torch, dtype_name), args)
                cases.append(case)
                mib = [
                    f"{b / 2**20:9.1f}" if b else f"{'n/a':>9}"
                    for b in (case["ref_peak_bytes"], case["op_peak_bytes"])
                ]
                print(
                    f"{dtype_name:>8} {n:>5} {d:>5} {case['formulation']:>5} {case['ref_ms']:9.1f} "
                    f"{case['op_ms']:9.1f} {case['speedup']:7.2f}x "
                    f"{case.get('speedup_cpu_time', float('nan')):7.2f}x {mib[0]} {mib[1]}",
                    flush=True,
                )
    device_name = (
        torch.cuda.get_device_name() if device_type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    )
    result = {
        "device": device_name,
        "commit": source_commit("csrc", "ilm_dist/ops", "bench/xcorr.py", "setup.py"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "torch": torch.__version__,
        "load_average_before": [round(load, 2) for load in load_before],
        "tf32_matmul": tf32_enabled(torch.device(device_type)),
        "self_check": self_check,
        "peak_memory": "torch.cuda.max_memory_allocated"
        if device_type == "cuda"
        else "torch.profiler allocation events",
        "cases": cases,
    }
    out = args.out or ROOT / "bench" / "results" / f"xcorr_{device_slug(device)}.json"
    write_result(result, out)


if __name__ == "__main__":
    main()
