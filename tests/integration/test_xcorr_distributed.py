"""bt_xcorr_loss_global in a real 2-process gloo run (torchrun) against the single-process global batch.

Run as a script, this file is the torchrun worker: each rank projects its slice of a global batch with a
shared per-layer matrix ``proj`` (standing in for the network), computes the global loss, and writes the
loss and gradient errors to ``<out>/rank<r>.json``; the pytest test launches it and checks them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import Tensor

from ilm_dist.distributed import all_gather_with_grad
from ilm_dist.ops import bt_xcorr_loss, bt_xcorr_loss_global, extension_available
from ilm_dist.ops.reference import batch_standardize

WORLD = 2
L, N_LOCAL, D_IN, D = 3, 6, 10, 16
EPS = 1e-5
IMPLS = ["torch", "ext"] if extension_available() else ["torch"]
LossFn = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]


def global_problem() -> tuple[Tensor, ...]:
    """x1, x2: [L, WORLD * N_LOCAL, D_IN] global batch, proj: [L, D_IN, D], on/off weights: [L] (float64)."""
    g = torch.Generator().manual_seed(0)
    x1 = torch.randn(L, WORLD * N_LOCAL, D_IN, generator=g, dtype=torch.float64)
    x2 = x1 + 0.5 * torch.randn(L, WORLD * N_LOCAL, D_IN, generator=g, dtype=torch.float64)
    proj = torch.randn(L, D_IN, D, generator=g, dtype=torch.float64)
    on = torch.rand(L, generator=g, dtype=torch.float64) + 0.5
    off = torch.rand(L, generator=g, dtype=torch.float64) * 0.1
    return x1, x2, proj, on, off


def run(loss_fn: LossFn, x1: Tensor, x2: Tensor, proj: Tensor, on: Tensor, off: Tensor) -> dict[str, Tensor]:
    """Loss, its gradients w.r.t. z1 = x1 @ proj, z2 = x2 @ proj, and w.r.t. proj."""
    proj = proj.clone().requires_grad_()
    z1, z2 = x1 @ proj, x2 @ proj
    z1.retain_grad()
    z2.retain_grad()
    loss = loss_fn(z1, z2, on, off)
    loss.sum().backward()
    return {"loss": loss.detach(), "z1": z1.grad, "z2": z2.grad, "proj": proj.grad}


def plain_all_reduce(x: Tensor) -> Tensor:
    """An autograd-unaware all_reduce: the forward sums over ranks, the gradient reaches only the local term."""
    total = x.detach().clone()
    dist.all_reduce(total)
    return x + (total - x.detach())


def official_style_loss(z1: Tensor, z2: Tensor, on: Tensor, off: Tensor) -> Tensor:
    """Official Barlow Twins: SyncBatchNorm-like global standardisation, local C, then a plain all_reduce(C)."""
    rank, n = dist.get_rank(), z1.shape[1] * dist.get_world_size()

    def local_rows(z: Tensor) -> Tensor:
        z_all = all_gather_with_grad(z, dim=1)  # differentiable, like SyncBatchNorm's statistics
        return batch_standardize(z_all, EPS)[:, rank * z.shape[1] : (rank + 1) * z.shape[1]]

    c = plain_all_reduce(local_rows(z1).transpose(1, 2) @ local_rows(z2)) / n
    diag = torch.diagonal(c, dim1=-2, dim2=-1)
    return on * (diag - 1).pow(2).sum(-1) + off * (c.pow(2).sum((-1, -2)) - diag.pow(2).sum(-1))


def engine_average(grad: Tensor) -> Tensor:
    """What DDP/DeepSpeed do with parameter gradients: the mean over ranks."""
    grad = grad.clone()
    dist.all_reduce(grad)
    return grad / dist.get_world_size()


def max_rel(x: Tensor, ref: Tensor) -> float:
    return ((x - ref).abs().max() / ref.abs().max()).item()


def worker(out_dir: Path) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    x1, x2, proj, on, off = global_problem()
    rows = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
    result = {}
    for impl in IMPLS:
        single = run(
            lambda a, b, w1, w2, impl=impl: bt_xcorr_loss(a, b, w1, w2, EPS, impl), x1, x2, proj, on, off
        )
        local = run(
            lambda a, b, w1, w2, impl=impl: bt_xcorr_loss_global(a, b, w1, w2, EPS, impl=impl),
            x1[:, rows].contiguous(),
            x2[:, rows].contiguous(),
            proj,
            on,
            off,
        )
        naive = run(official_style_loss, x1[:, rows].contiguous(), x2[:, rows].contiguous(), proj, on, off)
        result[impl] = {
            "loss": max_rel(local["loss"], single["loss"]),
            "z_grad_is_world_times_single": max(
                max_rel(local[z], world * single[z][:, rows]) for z in ("z1", "z2")
            ),
            "averaged_proj_grad": max_rel(engine_average(local["proj"]), single["proj"]),
            "naive_loss": max_rel(naive["loss"], single["loss"]),
            "naive_averaged_proj_grad_is_single_over_world": max_rel(
                engine_average(naive["proj"]), single["proj"] / world
            ),
            "naive_averaged_proj_grad_vs_single": max_rel(engine_average(naive["proj"]), single["proj"]),
        }
    (out_dir / f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


@pytest.mark.slow
def test_global_loss_and_gradients_on_two_gloo_ranks(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}"]
    proc = subprocess.run([*cmd, __file__, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for rank in range(WORLD):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert sorted(result) == sorted(IMPLS)
        for impl, err in result.items():
            assert err["loss"] < 1e-12, (rank, impl, err)
            assert err["z_grad_is_world_times_single"] < 1e-10, (rank, impl, err)
            assert err["averaged_proj_grad"] < 1e-10, (rank, impl, err)
            assert err["naive_loss"] < 1e-12, (rank, impl, err)
            assert err["naive_averaged_proj_grad_is_single_over_world"] < 1e-10, (rank, impl, err)
            assert err["naive_averaged_proj_grad_vs_single"] > 0.4, (rank, impl, err)


def test_without_process_group_is_the_local_loss():
    assert not dist.is_initialized()
    x1, x2, proj, on, off = global_problem()
    for impl in IMPLS:
        local = bt_xcorr_loss(x1 @ proj, x2 @ proj, on, off, EPS, impl)
        torch.testing.assert_close(bt_xcorr_loss_global(x1 @ proj, x2 @ proj, on, off, EPS, impl=impl), local)


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
