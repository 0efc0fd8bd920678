"""BatchNorm running statistics under DeepSpeed bf16 against their fp32 recomputation from the same inputs.

DeepSpeed casts the parameters to bf16 and, by default, leaves BatchNorm's buffers fp32; configurations
that cast the buffers too (``data_types.buffer_dtype``) accumulate ``r <- (1 - m) r + m * batch_stat`` in
bf16, whose 8-bit mantissa loses most of each step's update at m = 0.1. This check trains ilm_dist's
Trainer for ``--steps`` steps on the synthetic backend once per DeepSpeed config and, through forward
pre-hooks on every BatchNorm of the query encoder (in the engine) and of the key encoder, recomputes in
float64 what each running mean and variance should be after every step from the very inputs the layer saw
(batch mean and unbiased variance, PyTorch's update rule). It reports per config:

- whether a training step runs at all (bf16 on a CPU used to fail: ``expected scalar type BFloat16 but
  found Float``) and the error if not;
- the dtypes of the BatchNorm buffers;
- ``one_step``: the largest relative error of a single update (buffer after the step against float64
  ``(1 - m) * before + m * stat``), and ``drift``: the largest relative error after all steps against the
  float64 recursion from the initial buffers, for running_mean and running_var, with the worst layer.

A check that records, not a test that fails: every outcome is written to the JSON (``--out``), and the
exit status is 0 unless the script itself breaks. Usage::

    python bench/bn_stats.py [--arch resnet50] [--size 224] [--batch 64] [--steps 8] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import traceback
from pathlib import Path

import torch
from common import ROOT, device_slug, source_commit, write_result
from torch import Tensor, nn

from ilm_dist.config import load_config
from ilm_dist.train.trainer import Trainer

CONFIGS = {
    name: str(ROOT / "configs" / "deepspeed" / f"{file}.json")
    for name, file in (("fp32", "fp32"), ("bf16", "bf16_zero1"))
}
STATS = ("running_mean", "running_var")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cuda = torch.cuda.is_available()
    parser.add_argument("--arch", default="resnet50" if cuda else "resnet18")
    parser.add_argument("--size", type=int, default=224 if cuda else 32)
    parser.add_argument("--batch", type=int, default=64 if cuda else 4)
    parser.add_argument("--steps", type=int, default=8 if cuda else 2)
    parser.add_argument("--configs", nargs="+", choices=sorted(CONFIGS), default=sorted(CONFIGS))
    parser.add_argument("--out", type=Path, help="JSON path (default bench/results/bn_stats_<device>.json)")
    return parser.parse_args()


class Recorder:
    """Float64 recursion of every BatchNorm's running statistics from the inputs it sees in training mode."""

    def __init__(self, modules: dict[str, nn.modules.batchnorm._BatchNorm]):
        self.modules = modules
        self.expected = {
            name: {s: getattr(m, s).double().clone() for s in STATS} for name, m in modules.items()
        }
        self.one_step = {name: dict.fromkeys(STATS, 0.0) for name in modules}
        self._pending: dict[str, dict[str, Tensor]] = {}
        self.handles = [m.register_forward_pre_hook(self._before(name)) for name, m in modules.items()]

    def _before(self, name: str):
        def hook(module: nn.modules.batchnorm._BatchNorm, args: tuple) -> None:
            if not module.training:
                return
            x = args[0].detach().float()
            dims = [d for d in range(x.dim()) if d != 1]
            n = x.numel() // x.shape[1]
            mean = x.mean(dims, dtype=torch.float64)
            shape = [1, -1] + [1] * (x.dim() - 2)
            var = ((x - mean.float().view(shape)) ** 2).sum(dims, dtype=torch.float64) / (n - 1)
            m = module.momentum
            before = {s: getattr(module, s).double().clone() for s in STATS}
            self._pending[name] = {
                "running_mean": (1 - m) * before["running_mean"] + m * mean,
                "running_var": (1 - m) * before["running_var"] + m * var,
            }
            for s, stat in (("running_mean", mean), ("running_var", var)):
                self.expected[name][s] = (1 - m) * self.expected[name][s] + m * stat

        return hook

    def after_step(self) -> None:
        """Compare each updated buffer with its one-step float64 update (call after every training step)."""
        for name, want in self._pending.items():
            for s in STATS:
                got = getattr(self.modules[name], s).double()
                self.one_step[name][s] = max(self.one_step[name][s], rel_err(got, want[s]))
        self._pending = {}

    def report(self) -> dict:
        drift = {
            name: {s: rel_err(getattr(m, s).double(), self.expected[name][s]) for s in STATS}
            for name, m in self.modules.items()
        }
        out = {}
        for label, table in (("one_step", self.one_step), ("drift", drift)):
            out[label] = {}
            for s in STATS:
                worst = max(table, key=lambda name, s=s: table[name][s])
                out[label][s] = {"max_rel_err": table[worst][s], "layer": worst}
        return out


def rel_err(got: Tensor, want: Tensor) -> float:
    return ((got.cpu() - want.cpu()).norm() / want.cpu().norm().clamp_min(1e-30)).item()


def batch_norms(trainer: Trainer) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    roots = {"query": trainer.engine.module, "key": trainer.key_encoder}
    return {
        f"{root}.{name}": module
        for root, model in roots.items()
        for name, module in model.named_modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats
    }


def run_config(args: argparse.Namespace, ds_config: str, out: Path) -> dict:
    overrides = [
        f"model.arch={args.arch}",
        "data.backend=synthetic",
        f"data.image_size={args.size}",
        f"data.batch_size={args.batch}",
        f"data.synthetic.num_samples={args.batch * args.steps}",
        "loss.type=mse",
        f"engine.deepspeed_config={ds_config}",
        f"train.max_steps={args.steps}",
        "optim.schedule=constant",
        "optim.warmup_steps=0",
        "monitor.every=0",
        f"output_dir={out}",
    ]
    trainer = Trainer(load_config(ROOT / "configs/presets/mocov2.yaml", overrides))
    modules = batch_norms(trainer)
    result = {
        "engine_dtype": str(trainer.dtype).removeprefix("torch."),
        "batch_norm_layers": len(modules),
        "buffer_dtypes": sorted(
            {str(getattr(m, s).dtype).removeprefix("torch.") for m in modules.values() for s in STATS}
        ),
    }
    recorder = Recorder(modules)
    steps = 0
    try:
        for batch in trainer.loader.epoch(0):
            trainer.train_step(batch)
            recorder.after_step()
            steps += 1
    except Exception as err:  # recorded, not raised: this check reports what happens
        result["step_error"] = f"{type(err).__name__}: {err}".splitlines()[0][:500]
    finally:
        for handle in recorder.handles:
            handle.remove()
    result["steps_run"] = steps
    if steps:
        result |= recorder.report()
    return result


def main() -> None:
    args = parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results = {}
    with tempfile.TemporaryDirectory(prefix="ilm_dist_bn_") as tmp:
        for name in args.configs:
            try:
                results[name] = run_config(args, CONFIGS[name], Path(tmp) / name)
            except Exception as err:  # a config that cannot even build a Trainer is a finding too
                results[name] = {"setup_error": f"{type(err).__name__}: {err}".splitlines()[0][:500]}
                traceback.print_exc()
            print(f"{name}: {json.dumps(results[name])}", flush=True)
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "commit": source_commit(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "torch": torch.__version__,
        "settings": {"arch": args.arch, "size": args.size, "batch": args.batch, "steps": args.steps},
        "definition": "one_step: max over layers and steps of |buffer - float64((1-m) before + m stat)| / |...| "
        "(norms over channels); drift: the same after all steps against the float64 recursion from the "
        "initial buffers; stat: batch mean and unbiased variance of the layer's input, computed in float64",
        "configs": {name: {"deepspeed_config": CONFIGS[name], **r} for name, r in results.items()},
    }
    write_result(result, args.out or ROOT / "bench" / "results" / f"bn_stats_{device_slug(device)}.json")


if __name__ == "__main__":
    main()
