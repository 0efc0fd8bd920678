"""ZeRO 1/2 under ``torch_autocast`` on real ranks: the gradients DeepSpeed reduces, its reduction buffers,
and the fp16 loss scale.

    deepspeed --num_gpus 2 tests/dist_scripts/zero_precision.py OUT_DIR key=value ...

Trainers from configs/demo.yaml + the overrides, one after another in the same process group:

- ``bf16_zero1`` and ``bf16_zero2`` (``overlap_comm``): one step. The gradient DeepSpeed reduced
  (``deepspeed.utils.safe_get_full_grad``) is compared with the fp64 mean over the ranks of each rank's
  local gradient, computed without DeepSpeed (a copy of the weights, the same autocast forward, torch's
  backward); recorded with the dtypes of ZeRO's reduction buckets and the sizes of their buffers.
- ``fp16_zero1``: FP16_STEPS steps; at step INF_AT rank 1's gradient of one weight holds an inf.
  Before the first step and after each: the GradScaler's state, DeepSpeed's skipped steps and the sum of
  the weights.

Rank 0 writes OUT_DIR/result.json.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_grad

from ilm_dist import distributed as D
from ilm_dist.config import load_config
from ilm_dist.model.moco import MoCoILM
from ilm_dist.train.trainer import Trainer

FP16_STEPS, INF_AT = 4, 3


def trainer(out: Path, name: str, overrides: list[str]) -> Trainer:
    extra = [f"output_dir={out / name}", f"engine.deepspeed_config=configs/deepspeed/{name}.json"]
    return Trainer(load_config("configs/demo.yaml", [*overrides, *extra]))


def local_gradient(t: Trainer, images: torch.Tensor, keys: list[torch.Tensor]) -> torch.Tensor:
    """This rank's fp32 gradient of the loss without DeepSpeed, flattened in ``named_parameters`` order."""
    model = MoCoILM(t.cfg.model, t.cfg.moco, t.cfg.loss)
    model.load_state_dict(t.engine.module.state_dict())
    with torch.autocast(t.device.type, dtype=t.dtype):
        loss = model(images, keys, t.queue.keys)["loss"]
    loss.backward()  # outside autocast, as DeepSpeed's backward (inside, some gradients differ by ~1%)
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]
    return torch.cat([g.flatten() for g in grads])


def record_buffers(zero) -> dict:
    """The reduction buffers ZeRO allocates in the backward and frees at its end: {bucket dtype: [(numel,
    buffer dtype)]} as ``setup_buckets`` (runtime/zero/stage_1_and_2.py) leaves them."""
    seen, setup = {}, zero.setup_buckets

    def recording() -> None:
        setup()
        seen.update(
            {str(k): [[b.numel(), str(b.dtype)] for b in v.buffer] for k, v in zero.ipg_buckets.items()}
        )

    zero.setup_buckets = recording
    return seen


def reduced_against_local(t: Trainer) -> dict:
    """One step; DeepSpeed's reduced gradient against the mean of the ranks' local gradients."""
    batch = next(iter(t.loader.epoch(0))).to(t.device, t.dtype, t.cfg.model.channels_last)
    keys = t._key_features(batch.view2)
    local = local_gradient(t, batch.view1, keys)
    gathered = [torch.empty_like(local) for _ in range(D.world_size())]
    dist.all_gather(gathered, local)
    ranks = torch.stack(gathered).double()
    zero = t.engine.optimizer
    buffers = record_buffers(zero)
    t.engine.backward(t.engine(batch.view1, keys, t.queue.keys)["loss"])
    reduced = torch.cat([safe_get_full_grad(p).flatten() for p in t.engine.module.parameters()]).double()
    t.engine.step()
    # error of each element relative to the size of the gradients summed, in units of fp32's unit roundoff
    error = (reduced - ranks.mean(0)).abs() / ranks.abs().mean(0).clamp_min(torch.finfo(torch.float32).tiny)
    return {
        "bucket_dtypes": sorted(map(str, zero.ipg_buckets)),
        "bucket_buffers": buffers,
        "reduce_bucket_size": zero.reduce_bucket_size,
        "max_error_u": float(error.max()) / 2**-24,
    }


def inf_gradient(grad: torch.Tensor) -> torch.Tensor:
    grad = grad.clone()
    grad[(0,) * grad.dim()] = float("inf")
    return grad


def fp16_steps(t: Trainer) -> list[dict]:
    """FP16_STEPS steps, an inf in one gradient of rank 1 at step INF_AT; the state before and after each."""
    scaler = t.engine.optimizer.torch_autocast_gradscaler
    weight = next(t.engine.module.parameters())

    def record(inf: bool) -> dict:
        weights = sum(float(p.detach().double().sum()) for p in t.engine.module.parameters())
        return {"inf": inf, "skipped": t.engine.skipped_steps, **scaler.state_dict(), "weights": weights}

    records, batches = [record(False)], iter(t.loader.epoch(0))
    for step in range(1, FP16_STEPS + 1):
        handle = weight.register_hook(inf_gradient) if step == INF_AT and D.rank() == 1 else None
        t.train_step(next(batches))
        if handle is not None:
            handle.remove()
        records.append(record(step == INF_AT))
    return records


if __name__ == "__main__":
    out, *overrides = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    out = Path(out)
    result = {
        name: reduced_against_local(trainer(out, name, overrides)) for name in ("bf16_zero1", "bf16_zero2")
    }
    result["fp16_zero1"] = fp16_steps(trainer(out, "fp16_zero1", overrides))
    if D.rank() == 0:
        (out / "result.json").write_text(json.dumps(result))
    D.shutdown()
